"""Batch sampling and the objective every method shares: reproducible from a seed, epochs that hold each example
as often as asked, dropout only where asked, and the weighted loss."""
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from hyperreal.training import DenoisingObjective
from hyperreal.training.sampling import EpochQueue, drop_captions, noise_and_timesteps


def test_epochs_hold_every_index_as_often_as_listed_and_repeat_from_the_seed():
    epoch = [0, 0, 0, 1, 2]  # index 0 repeated three times (kohya's repeats)
    a = EpochQueue(epoch, torch.Generator().manual_seed(3))
    drawn = torch.cat([a.take(2) for _ in range(5)]).tolist()  # two whole epochs
    assert sorted(drawn) == sorted(epoch * 2)
    b = EpochQueue(epoch, torch.Generator().manual_seed(3))
    assert torch.cat([b.take(2) for _ in range(5)]).tolist() == drawn
    c = EpochQueue(epoch, torch.Generator().manual_seed(4))
    assert torch.cat([c.take(2) for _ in range(5)]).tolist() != drawn


def test_caption_dropout_only_where_asked():
    g = torch.Generator().manual_seed(0)
    text = torch.arange(1000)
    drop_captions(text, 0.0, empty=-1, g=g)
    assert (text >= 0).all()  # p = 0 draws nothing and drops nothing
    among = torch.arange(1000) % 2 == 0
    drop_captions(text, 0.5, empty=-1, g=g, among=among)
    dropped = text == -1
    assert dropped.any() and not (dropped & ~among).any() and 0.35 < dropped[among].float().mean() < 0.65


def test_noise_and_timesteps_follow_the_generator():
    lat = torch.zeros(3, 4, 8, 8)
    a = noise_and_timesteps(lat, 1000, torch.Generator().manual_seed(1))
    b = noise_and_timesteps(lat, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["timesteps"], b["timesteps"])
    assert a["noise"].shape == lat.shape and a["timesteps"].shape == (3,) and int(a["timesteps"].max()) < 1000


def test_weighted_loss_is_the_mean_of_weighted_examples():
    obj = DenoisingObjective(DDPMScheduler().config)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(obj.loss(pred, target), F.mse_loss(pred, target))
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(obj.loss(pred, target, torch.tensor([1.0, 3.0])), (per * torch.tensor([1.0, 3.0])).mean())
