"""The three ways to adapt a frozen base, one package each with the same files:

- ``spec``: what the method adds to the base and how it is attached;
- ``files``: what it writes and reads (and where those files load elsewhere);
- ``runtime``: applying it at generation time, including its key in generation jobs (``JOB``);
- ``train``: its data, its learners for the shared training loop, and the request that builds them.

``JOB_KEYS`` lists the job keys in the order they apply to a job: adapters change weights, the bridge changes
the text conditioning, and ControlNet swaps in its pipeline around the (adapted) UNet.
"""
from .adapters.runtime import JOB as ADAPTERS_JOB
from .bridge.runtime import JOB as BRIDGE_JOB
from .controlnet.runtime import JOB as CONTROLNET_JOB

JOB_KEYS = (ADAPTERS_JOB, BRIDGE_JOB, CONTROLNET_JOB)
