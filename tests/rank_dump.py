"""Run the `diffuse` CLI (under torchrun) and dump every rank's final weights into $DUMP_DIR/rankN.safetensors.

The training loop's "end" event carries the step object, so this test helper needs no hook in the
engine: it wraps ``training.train`` to add a callback.
"""

import os
from pathlib import Path

from safetensors.torch import save_file

from diffuse_cli.cli import main
from diffuse_cli.engine import training

_train = training.train


def _dumping_train(*args, callback=None, **kwargs):
    def on_event(e: dict) -> None:
        if e["event"] == "end":
            ts, rank = e["step_obj"], e["dist"].rank
            sd = {
                **{f"model.{k}": v for k, v in ts.model.state_dict().items()},
                **{f"ema.{k}": v for k, v in ts.ema.model.state_dict().items()},
            }
            out = Path(os.environ["DUMP_DIR"]) / f"rank{rank}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(out))
        if callback is not None:
            callback(e)

    return _train(*args, callback=on_event, **kwargs)


training.train = _dumping_train
if __name__ == "__main__":
    main()
