"""A 2-process CPU DDP run (gloo) of a datamodule under a recording LightningModule.

`run_datamodule_ddp(tmp_path, "RawFrameListDataModule", {...})` fits one epoch and tests, then returns
what each rank saw: {"train": video ids, "test": video ids, "test_views": views, "test_bad": bad
video ids, "shapes": per-test-batch [C,T,H,W]}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    import datamodules

    root, out, data_class, data_kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)
            self.seen = {"train": [], "test": [], "test_views": [], "test_bad": [], "shapes": []}

        def training_step(self, batch, _):
            self.seen["train"] += batch["video_id"].tolist()
            x = batch["video"].float().mean(dim=(2, 3, 4)) / 255
            return torch.nn.functional.cross_entropy(self.fc(x), batch["label"])

        def test_step(self, batch, _):
            self.seen["test"] += batch["video_id"].tolist()
            self.seen["test_views"] += batch["view"].tolist()
            self.seen["test_bad"] += batch["bad_video_ids"].tolist()
            self.seen["shapes"].append(list(batch["video"].shape[1:]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(0)
    dm = getattr(datamodules, data_class)(root=root, **data_kwargs)
    model = Recorder()
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump(model.seen, fh)
    """
)


def run_datamodule_ddp(root: Path, data_class: str, data_kwargs: dict) -> list[dict]:
    """Run the recorder on 2 gloo processes with `datamodules.<data_class>(root=root, **data_kwargs)`;
    the per-rank records (rank 0 first). Fails the test with the processes' stderr on a non-zero exit."""
    script = Path(root) / "ddp_run.py"
    script.write_text(_SCRIPT, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(root), data_class, json.dumps(data_kwargs)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=240,
        env=env,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((Path(root) / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(2)]
