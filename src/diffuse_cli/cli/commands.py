"""Every command, registered with the app in the order `diffuse --help` lists them."""

from . import eval, export, inpaint, interpolate, noise, report, sample, schedule, train
from .app import app

app.command(no_args_is_help=False)(schedule.schedule)
app.command(no_args_is_help=True)(noise.noise)
app.command(no_args_is_help=True)(train.train)
app.command(no_args_is_help=True)(sample.sample)
app.command(no_args_is_help=True)(inpaint.inpaint)
app.command(no_args_is_help=True)(interpolate.interpolate)
app.command(no_args_is_help=True)(export.export)
app.command("eval", no_args_is_help=True)(eval.eval_)
app.command(no_args_is_help=True)(report.report)
