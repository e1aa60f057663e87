from detserve.training.recipes import _cli

_cli()
