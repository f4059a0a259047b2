"""How strongly each of SeCo's loss terms pushes the shared encoder, and how much of L_LiG acts.

Analysis only (nothing is trained or chosen on reported data). For a checkpoint of a SeCo run
(its reservoir full and its prototypes seen, i.e. after ``loss.stage_contrast``) and a few
training batches of the run's data, it calls ``SeCoMethod.training_step`` once per term with
every other loss weight set to 0 (same batch, same crops: the RNG is re-seeded for every call)
and reports:

* the weighted loss and the norm of its gradient on the ViT encoder (``model.backbone``), for
  L_cls, L_cls^aux, PTC, L_LiL in the release's and in Eq. 8's normalisation (both at the run's
  beta), and L_LiG with the batch's and the image's categories as P_s (at the run's alpha);
* for each P_s reading, the share of L_LiG's anchors that have at least one negative prototype
  (an anchor without one contributes log 1 = 0).

    python bench/seco_loss_strength.py RUN_DIR [--checkpoint CKPT] [--batches 4] [--out PREFIX]

``PREFIX.md`` / ``PREFIX.json`` are written when ``--out`` is given. Median over batches, with
the min and max.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

TERMS = {  # name: (weights kept from the run, overrides)
    "L_cls": ({"cls"}, {}),
    "L_cls^aux": ({"cls_aux"}, {}),
    "PTC": ({"ptc"}, {}),
    "L_LiL, release form": ({"lil"}, {"loss.lil_form": "release"}),
    "L_LiL, Eq. 8 form": ({"lil"}, {"loss.lil_form": "paper"}),
    "L_LiG, batch P_s": ({"lig"}, {"seco.lig_negatives": "batch"}),
    "L_LiG, image P_s": ({"lig"}, {"seco.lig_negatives": "image"}),
}
WEIGHTS = ("cls", "cls_aux", "ptc", "lig", "lil", "seg", "reg")


def _set(cfg, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def load_seco_run(run_dir: Path, checkpoint: str | None = None):
    """``(method, cfg, info, meta, model, state, teacher, step, path)`` of a SeCo run at a checkpoint
    (default: its last), on the CPU; refuses a checkpoint before ``loss.stage_contrast``."""
    from labelwise.blocks.ema import EMATeacher
    from labelwise.config import load_config
    from labelwise.engine import api
    from labelwise.engine.checkpoint import load_checkpoint, load_module_state
    from labelwise.engine.registry import get_method

    meta = api.read_run(run_dir)
    method = get_method(meta["method"])
    if method.name != "seco":
        raise SystemExit(f"{run_dir}: a '{method.name}' run; this script measures SeCo runs")
    cfg = load_config(method.config_cls, run_dir / "config.yaml")
    info = api.load_info(run_dir)
    path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    model = method.build_model(cfg, info, pretrained=False)
    state = method.build_state(cfg, info)
    load_module_state(model, ckpt["model"], path)
    load_module_state(state, ckpt["state"], path, "state")
    teacher = EMATeacher(method.ema_module(model))
    load_module_state(teacher, ckpt["ema"], path, "EMA teacher")
    teacher.eval()
    step = int(ckpt.get("step", cfg.train.max_steps))
    if step < cfg.loss.stage_contrast:
        raise SystemExit(f"{path}: step {step} is before loss.stage_contrast ({cfg.loss.stage_contrast}); "
                         "pass a later --checkpoint")
    return method, cfg, info, meta, model, state, teacher, step, path


def write_report(text: str, result, out: str | None) -> None:
    """Print the markdown table; with ``out``, also write ``out.md`` and ``out.json``."""
    print(text)
    if out:
        Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(out + ".md").write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a SeCo training run folder")
    p.add_argument("--checkpoint", default=None, help="checkpoint to measure at (default: the run's last)")
    p.add_argument("--batches", type=int, default=4, help="training batches to average over (default 4)")
    p.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from labelwise.engine.method import StepContext

    run_dir = Path(args.run)
    method, cfg, info, meta, model, state, teacher, step, path = load_seco_run(run_dir, args.checkpoint)
    if not int(state.queue.count) and not bool(state.seen.any()):
        raise SystemExit(f"{path}: neither the reservoir nor the prototypes were ever filled (a run without LiL and "
                         "LiG, or a checkpoint before loss.stage_contrast); pass another run or --checkpoint")
    terms = dict(TERMS)
    if not bool(state.seen.any()):  # a run without L_LiG (w/o LiG row) never updates the prototypes
        terms = {n: t for n, t in terms.items() if "lig" not in t[0]}
    if not int(state.queue.count):  # a run without L_LiL (w/o LiL row) never fills the reservoir
        terms = {n: t for n, t in terms.items() if "lil" not in t[0]}

    ds = method.build_train_dataset(cfg, meta["data"], info)
    B = cfg.train.batch_size
    batches = [method.collate([ds[(b * B + i, 1000 * b + i)] for i in range(B)]) for b in range(args.batches)]
    rows: dict[str, dict[str, list[float]]] = {name: {"loss": [], "grad": [], "with_negative": []} for name in terms}
    encoder = [p for p in model.backbone.parameters() if p.requires_grad]
    model.train()
    for bi, batch in enumerate(batches):
        for name, (keep, overrides) in terms.items():
            c = copy.deepcopy(cfg)
            c.seco.lig = c.seco.lil = True
            c.seco.rectify = bool(int(state.queue.count))
            for w in WEIGHTS:
                if w not in keep:
                    setattr(c.loss, w, 0.0)
            for k, v in overrides.items():
                _set(c, k, v)
            ctx = StepContext(cfg=c, info=info, step=step, max_steps=cfg.train.max_steps, epoch=0, steps_per_epoch=1,
                              device=torch.device("cpu"), module=model, teacher=teacher, state=state)
            model.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(bi)
                out = method.training_step(model, batch, ctx)
            out["loss"].backward()
            grad = torch.sqrt(sum((q.grad.float() ** 2).sum() for q in encoder if q.grad is not None))
            rows[name]["loss"].append(float(out["loss"].detach()))
            rows[name]["grad"].append(float(grad))
            if "lig" in keep:
                rows[name]["with_negative"].append(float(out["lig_with_negative"]))
        method._keys = method._cls = None

    def stat(v):
        return {"median": statistics.median(v), "min": min(v), "max": max(v)} if v else None

    result = {"run": str(run_dir), "checkpoint": str(path), "step": step, "batches": args.batches,
              "beta": cfg.loss.lil, "alpha": cfg.loss.lig,
              "terms": {n: {k: stat(v) for k, v in r.items()} for n, r in rows.items()}}
    cls = result["terms"]["L_cls"]["grad"]["median"]
    lines = [f"Run `{run_dir}`, checkpoint step {step}, {args.batches} batches of {B}; alpha {cfg.loss.lig}, "
             f"beta {cfg.loss.lil}. Median (min-max) over batches.", "",
             "| term | weighted loss | gradient norm on the encoder | / L_cls | anchors with a negative |",
             "|---|---|---|---|---|"]
    for n, r in result["terms"].items():
        wn = r["with_negative"]
        neg = f"{wn['median']:.2f} ({wn['min']:.2f}-{wn['max']:.2f})" if wn else ""
        lines.append(f"| {n} | {r['loss']['median']:.3f} ({r['loss']['min']:.3f}-{r['loss']['max']:.3f}) | "
                     f"{r['grad']['median']:.3f} ({r['grad']['min']:.3f}-{r['grad']['max']:.3f}) | "
                     f"{r['grad']['median'] / max(cls, 1e-12):.2f} | {neg} |")
    write_report("\n".join(lines), result, args.out)


if __name__ == "__main__":
    main()
