import warnings

# library chatter (deprecations) is noise on a command line; set before the libraries are imported
warnings.filterwarnings("ignore")

from .cli import main  # noqa: E402

raise SystemExit(main())
