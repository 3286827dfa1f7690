"""vmm's Trainer: `demo` (fit, then test the best checkpoint), atomic checkpoint files loaded with
weights_only=True, and the shell's exit statuses after SIGTERM (143) and SIGINT (130)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.plugins import CheckpointIO, LayerSync, Precision
from lightning.pytorch.plugins.environments import ClusterEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .io import AtomicCheckpointIO

__all__ = ["EXIT_SIGINT", "EXIT_SIGTERM", "INTERRUPTED_CKPT", "VMMTrainer"]

# The file `InterruptCheckpoint` saves beside the ModelCheckpoint files on SIGTERM / Ctrl+C during fit.
INTERRUPTED_CKPT = "interrupted.ckpt"
# Exit statuses of a run stopped by a signal, as a shell reports them (128 + signal number).
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
EXIT_SIGINT = 128 + signal.SIGINT  # 130
# What Trainer(plugins=...) takes, spelled with public names so the CLI can instantiate each kind.
PluginInput = Precision | ClusterEnvironment | CheckpointIO | LayerSync


@contextlib.contextmanager
def _signal_exit_status(what: str) -> Any:
    """Turn Lightning's exits after a signal into the shell's statuses: SIGTERM 143, SIGINT 130.

    Lightning ends a run stopped by SIGTERM with a bare SystemExit (status 0) and one stopped by
    Ctrl+C with status 1, after its graceful shutdown (callbacks' on_exception, loggers finalised);
    schedulers and `fit && test` chains must see that the run did not finish.
    """
    try:
        yield
    except SIGTERMException:
        rank_zero_info(f"[vmm] {what} stopped by SIGTERM; exiting with status {EXIT_SIGTERM}")
        raise SystemExit(EXIT_SIGTERM) from None
    except SystemExit as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise SystemExit(EXIT_SIGINT) from None
        raise
    except KeyboardInterrupt:
        raise SystemExit(EXIT_SIGINT) from None


class VMMTrainer(Trainer):
    """`lightning.Trainer` with `demo` (fit, then test the best checkpoint, then print a summary),
    atomic checkpoint files loaded with weights_only=True (`AtomicCheckpointIO`, unless a
    CheckpointIO plugin is given), and exit status 143/130 after SIGTERM/SIGINT."""

    def __init__(self, *args: Any, plugins: PluginInput | list[PluginInput] | None = None, **kwargs: Any) -> None:
        """Args: as `lightning.Trainer`; `plugins` (Trainer's type, so the CLI instantiates them) gets an
        `AtomicCheckpointIO` unless one of them is a CheckpointIO."""
        plugin_list = list(plugins) if isinstance(plugins, (list, tuple)) else ([plugins] if plugins else [])
        if not any(isinstance(p, CheckpointIO) for p in plugin_list):
            plugin_list.append(AtomicCheckpointIO())
        super().__init__(*args, plugins=plugin_list, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's `Trainer.fit`, ending with the shell's exit status after SIGTERM or SIGINT."""
        with _signal_exit_status("fit"):
            super().fit(*args, **kwargs)

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        """Lightning's `Trainer.validate`, ending with the shell's exit status after SIGTERM or SIGINT."""
        with _signal_exit_status("validate"):
            return super().validate(*args, **kwargs)

    def test(self, *args: Any, **kwargs: Any) -> Any:
        """Lightning's `Trainer.test`, ending with the shell's exit status after SIGTERM or SIGINT."""
        with _signal_exit_status("test"):
            return super().test(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """Lightning's `Trainer.predict`, ending with the shell's exit status after SIGTERM or SIGINT."""
        with _signal_exit_status("predict"):
            return super().predict(*args, **kwargs)

    def demo(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
    ) -> dict[str, Any]:
        """Train, then test the best checkpoint; print the test accuracy and the checkpoint path.

        Args:
            model: the model to train.
            datamodule: the data (its train/val/test splits).
            ckpt_path: resume training from this checkpoint.
        """
        try:
            self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except SystemExit as exc:
            how = {EXIT_SIGTERM: "by SIGTERM", EXIT_SIGINT: "by SIGINT (Ctrl+C)"}.get(exc.code)
            if how and self.is_global_zero:
                saved = self.checkpoint_callback and Path(self.checkpoint_callback.dirpath or "") / INTERRUPTED_CKPT
                resume = f"; resume with --ckpt_path {saved}" if saved and saved.is_file() else ""
                print(f"\nvmm demo interrupted {how} during training; the test was not run{resume}", flush=True)
            raise
        ckpt_cb = self.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") or getattr(ckpt_cb, "last_model_path", "") or None
        self.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        res = dict(getattr(model, "last_eval", {}).get("test", {}))
        log_dir = self.log_dir  # a collective under DDP: every rank must ask
        if self.is_global_zero:
            k = getattr(model, "num_classes", None)
            lines = ["", "=" * 72, "vmm demo finished"]
            if res:
                lines.append(
                    f"  test accuracy (video level): top-1 {100 * res['top1']:.1f}%  top-5 {100 * res['top5']:.1f}%"
                    f"  mean-class {100 * res['mean_class']:.1f}%  on {res['num_videos']} videos"
                )
            notes = datamodule.result_notes(res) if callable(getattr(datamodule, "result_notes", None)) else []
            if notes:  # the datamodule knows its own chance level and ceilings
                lines += [f"  {n}" for n in notes]
            elif k:
                lines.append(f"  K = {k} classes: chance {100 / k:.1f}%")
            lines.append(f"  checkpoint: {Path(best).resolve() if best else None}")
            if log_dir:
                lines.append(
                    f"  logs: {log_dir} (metrics.csv, test_results.json, confusion_matrix_test.png, scores_test.json)"
                )
            lines.append("=" * 72)
            print("\n".join(lines), flush=True)
        return res
