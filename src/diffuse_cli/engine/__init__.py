"""The core engine: schedules, the Gaussian process, the U-Net, training and sampling.

Nothing here prints, imports typer/rich or exits the process; user mistakes are
raised as :class:`diffuse_cli.engine.errors.DiffuseError`.
"""
