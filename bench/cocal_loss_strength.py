"""What CoCal's loss terms do to the network at the end of training: value, gradient norm and
direction of each weighted term, and how many anchors of Eqs. 5-7 sit at their floor.

Analysis only (nothing is trained; no optimiser step, the memory banks are not written). For each
finished ``labelwise train cocal`` run folder it restores the model *and* its memory banks with the
project's loader (``engine.api.load_run``: ``config.yaml``, ``info.json``, ``checkpoints/last.pt``),
draws ``--batches`` fixed training batches (the run's data spec from ``run.json``, the method's
train transforms and collate, ``train.batch_size`` images each, the trainer's sampler at
``--seed``) and calls the method's own ``CoCalMethod.training_step`` once per batch, model in train
mode, autocast as ``train.amp``. The step returns only the total and detached logs, so the
script records the loss tensors at the functions the step weights, while the step runs:

* ``L_kMaX``  = ``method.decoder_loss`` (every kMaX term of every decoder prediction + the auxiliary
  semantic losses), weight ``cocal.w_kmax``;
* ``L_p_con`` (Eq. 5) / ``L_o_con`` (Eq. 6) = the step's two direct calls of
  ``blocks.dictionary_contrastive.dictionary_contrastive_loss`` (part anchors vs the part bank,
  object anchors vs the object bank, in this order), weights ``cocal.w_p_con`` / ``cocal.w_o_con``;
* ``L_logic`` (Eq. 7) = ``logic_loss``, ``L_logic_rev`` (Fig. 1's "vice versa") =
  ``reverse_logic_loss``, weight ``cocal.w_logic`` each.

It checks that each recorded term equals what the step logs for it and that the weighted sum
equals the step's ``loss`` (an error otherwise: the step changed). A term switched off in the
config is not computed by the step and gets no row. For each term (and the total), mean over the
batches of:

* the unweighted value and the weight;
* the L2 norm of the *weighted* term's gradient on (a) ``queries``: the learned dictionary
  component embeddings (kMaX ``decoder._cluster_centers``; Mask2Former ``query_feat`` +
  ``query_embed``), (a') ``components``: every transformer-decoder parameter on the path that turns
  them and the pixel features into the final components C(y), C~(y) (``cluster_centres``),
  queries included, i.e. the decoder less kMaX's pixel-embedding heads (``_pixel_space_*``, which
  only make the per-pixel embeddings the masks are read from), (b) ``trunk``: backbone + pixel
  decoder (the auxiliary semantic heads and the pixel-embedding heads are in no group);
* the ratio of the trunk norm to L_kMaX's, and the cosine between the term's gradient and
  L_kMaX's on each of the three groups (of the unweighted term, so also defined at weight 0);
* Eqs. 5-7: the share of anchors (those with at least one positive) whose per-anchor loss (the
  same function with ``reduction="none"``) is within ``--floor-tol`` (0.01) of its floor
  ``log |B(x)|`` (|B(x)| = the anchor's valid positives, which are in the denominator), and the
  mean excess ``loss - log |B(x)|`` over those anchors.

A value undefined in a batch (no anchor with a positive; a zero gradient's cosine) is left out of
that mean and is empty (JSON null) where no batch defines it.

    python bench/cocal_loss_strength.py RUN_DIR [RUN_DIR ...] [--batches 8] [--seed 0]
        [--checkpoint CKPT] [--device cpu] [--set cocal.KEY=VALUE ...] [--md OUT.md] [--json OUT.json]

``--set`` evaluates terms with other loss settings than the run trained with (e.g. L_p_con on a
dictionary-only run: ``--set cocal.p_con=true``); only ``cocal.*`` keys other than
``cocal.dictionary`` (which changes the network). The banks are the checkpoint's: they hold the
components of the last training steps, so they lag the restored weights by up to S steps, as in
training.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
from pathlib import Path

import torch

# term name -> (cocal switch, weight key); in the order the step adds them
TERMS = {"L_kMaX": (None, "w_kmax"), "L_p_con": ("p_con", "w_p_con"), "L_o_con": ("o_con", "w_o_con"),
         "L_logic": ("logic_loss", "w_logic"), "L_logic_rev": ("logic_reverse", "w_logic")}
LOG_KEYS = {"L_p_con": "p_con", "L_o_con": "o_con", "L_logic": "logic", "L_logic_rev": "logic_reverse"}
QUERY_PARAMS = ("_cluster_centers", "query_feat", "query_embed")  # kMaX / Mask2Former
PIXEL_HEADS = "._pixel_space_"  # kMaX: pixel-embedding head + mask BN, not on the path to C(y)


# --------------------------------------------------------------------------- loading
def load(run_dir: Path, checkpoint: str | None, device: str, sets: list[str]):
    """``(loaded run, cfg with --set applied, checkpoint step, checkpoint path)`` via ``api.load_run``."""
    from labelwise.config import apply_overrides, from_dict, parse_overrides, to_dict
    from labelwise.engine import api
    from labelwise.engine.checkpoint import load_checkpoint

    if api.read_run(run_dir)["method"] != "cocal":
        raise SystemExit(f"{run_dir}: a '{api.read_run(run_dir)['method']}' run; this script measures cocal runs")
    for key, _ in parse_overrides(sets):
        if not key.startswith("cocal.") or key == "cocal.dictionary":
            raise SystemExit(f"--set {key}: only cocal.* loss keys other than cocal.dictionary can change here")
    run = api.load_run(run_dir, device=device, checkpoint=checkpoint)
    cfg = run.cfg
    if sets:
        cfg = from_dict(run.method.config_cls, apply_overrides(to_dict(cfg), sets, run.method.config_cls), "--set")
    if not cfg.cocal.dictionary or run.state is None:
        raise SystemExit(f"{run_dir}: trained without cocal.dictionary; no components, banks or contrastive terms")
    path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "last.pt"
    step = int(load_checkpoint(path).get("step", cfg.train.max_steps))
    return run, cfg, step, path


def fixed_batches(method, cfg, spec: str, info, n: int, seed: int) -> list:
    """``n`` batches of ``train.batch_size`` training samples: the trainer's sampler at ``seed``
    (epochs 0, 1, ... as needed), the method's train dataset (transforms) and collate; the global
    torch RNG is seeded too, because the colour jitter reads it despite the per-sample generator."""
    from labelwise.engine.data import ShardedSampler

    ds = method.build_train_dataset(cfg, spec, info)
    B = cfg.train.batch_size
    sampler = ShardedSampler(len(ds), B, seed=seed)
    if sampler.batches_per_epoch == 0:
        raise SystemExit(f"training split has {len(ds)} images, fewer than train.batch_size = {B}")
    keys, epoch = [], 0
    while len(keys) < n * B:
        sampler.set_position(epoch)
        keys += list(sampler)
        epoch += 1
    with torch.random.fork_rng(devices=[]):  # v2.ColorJitter draws its factors from the global torch RNG
        torch.manual_seed(seed)
        return [method.collate([ds[k] for k in keys[b * B:(b + 1) * B]]) for b in range(n)]


def param_groups(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    dec = [(f"decoder.{n}", p) for n, p in model.decoder.named_parameters() if p.requires_grad]
    trunk = [(f"{m}.{n}", p) for m in ("backbone", "pixel_decoder")
             for n, p in getattr(model, m).named_parameters() if p.requires_grad]
    queries = [(n, p) for n, p in dec if any(q in n for q in QUERY_PARAMS)]
    if not queries:
        raise SystemExit("found no query / cluster-centre embedding in model.decoder")
    return {"queries": queries, "components": [(n, p) for n, p in dec if PIXEL_HEADS not in n], "trunk": trunk}


# --------------------------------------------------------------------------- one step, terms recorded
@contextlib.contextmanager
def record_terms(method):
    """While the step runs: every ``dictionary_contrastive_loss`` call (arguments, result), tagged with
    the Eq. 7 function that made it (``logic_loss`` / ``reverse_logic_loss``) or ``None`` for the
    step's direct calls, and ``decoder_loss``'s total."""
    import labelwise.blocks.dictionary_contrastive as dc

    orig = {n: getattr(dc, n) for n in ("dictionary_contrastive_loss", "logic_loss", "reverse_logic_loss")}
    sig = inspect.signature(orig["dictionary_contrastive_loss"])
    rec = {"contrastive": [], "kmax": []}
    outer: list[str] = []

    def contrastive(*a, **k):
        out = orig["dictionary_contrastive_loss"](*a, **k)
        bound = sig.bind(*a, **k)
        bound.apply_defaults()
        rec["contrastive"].append((outer[0] if outer else None, dict(bound.arguments), out))
        return out

    def tagged(name):
        def f(*a, **k):
            outer.append(name)
            try:
                return orig[name](*a, **k)
            finally:
                outer.pop()
        return f

    def decoder_loss(*a, **k):
        total, logs = type(method).decoder_loss(method, *a, **k)
        rec["kmax"].append(total)
        return total, logs

    dc.dictionary_contrastive_loss = contrastive
    dc.logic_loss, dc.reverse_logic_loss = tagged("logic_loss"), tagged("reverse_logic_loss")
    method.decoder_loss = decoder_loss
    try:
        yield rec
    finally:
        for n, f in orig.items():
            setattr(dc, n, f)
        del method.decoder_loss


def split_terms(rec, out: dict, cc) -> dict[str, tuple[torch.Tensor, float, dict | None]]:
    """``{term: (unweighted loss tensor, weight, contrastive-call arguments or None)}`` from what
    :func:`record_terms` saw, checked against the step's logs and total."""
    direct = [c for c in rec["contrastive"] if c[0] is None]
    by_tag = {t: [c for c in rec["contrastive"] if c[0] == t] for t in ("logic_loss", "reverse_logic_loss")}
    calls = {"L_p_con": None, "L_o_con": None}
    for name in [n for n in ("L_p_con", "L_o_con") if getattr(cc, TERMS[n][0])]:
        calls[name] = direct.pop(0) if direct else None
    calls["L_logic"] = by_tag["logic_loss"][0] if by_tag["logic_loss"] else None
    calls["L_logic_rev"] = by_tag["reverse_logic_loss"][0] if by_tag["reverse_logic_loss"] else None
    if len(rec["kmax"]) != 1 or direct or any(len(v) > 1 for v in by_tag.values()):
        raise RuntimeError("CoCalMethod.training_step made other loss calls than this script expects; update it")
    terms = {"L_kMaX": (rec["kmax"][0], float(cc.w_kmax), None)}
    for name, c in calls.items():
        switch = TERMS[name][0]
        if getattr(cc, switch) != (c is not None) or (c is not None) != (LOG_KEYS[name] in out):
            raise RuntimeError(f"{name}: cocal.{switch}={getattr(cc, switch)} but the step "
                               f"{'made' if c is not None else 'did not make'} its call; update the script")
        if c is None:
            continue
        if not torch.equal(c[2].detach(), out[LOG_KEYS[name]]):
            raise RuntimeError(f"{name}: recorded {float(c[2])} but the step logs {float(out[LOG_KEYS[name]])}")
        terms[name] = (c[2], float(getattr(cc, TERMS[name][1])), c[1])
    total = sum(w * t for t, w, _ in terms.values())
    if not torch.allclose(total.detach().float(), out["loss"].detach().float(), rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"the weighted terms sum to {float(total)}, the step's loss is {float(out['loss'])}")
    return terms


def floor_stats(args: dict, tol: float) -> dict[str, float]:
    """Per-anchor loss of the recorded call (same arguments, ``reduction="none"``) against its floor
    log |B(x)|: share of anchors with a positive within ``tol`` of it, mean excess, anchors counted."""
    from labelwise.blocks.dictionary_contrastive import dictionary_contrastive_loss

    with torch.no_grad():
        per = dictionary_contrastive_loss(**{**args, "reduction": "none"}).float()
        cls, valid = args["anchor_classes"], args["bank_valid"].bool()
        counts = valid.sum(1).to(per.device, torch.float32)                     # (P,) valid entries per class
        if cls.dim() == 2:                                                      # membership matrix (M, P)
            n_pos = cls.to(per.device).float() @ counts
        else:
            cls = cls.reshape(-1).to(per.device, torch.long)
            ok = (cls >= 0) & (cls < counts.shape[0])
            n_pos = torch.where(ok, counts[cls.clamp(0, counts.shape[0] - 1)], torch.zeros_like(per))
        has = n_pos > 0
        excess = (per - n_pos.clamp_min(1).log())[has]
    n = int(has.sum())
    return {"at_floor": float((excess <= tol).float().mean()) if n else None,
            "excess": float(excess.mean()) if n else None, "anchors": float(n)}


def measure_batch(method, model, batch, ctx, groups, tol: float) -> dict[str, dict[str, float]]:
    """One training step's terms on ``batch``: value, weight, gradient norms per group, cosines with
    L_kMaX, and the floor statistics of Eqs. 5-7 (queries are a subset of the components)."""
    names = list(groups)
    flat = [p for n in ("components", "trunk") for _, p in groups[n]]
    index = {id(p): i for i, p in enumerate(flat)}
    with record_terms(method) as rec:
        out = method.training_step(model, batch, ctx)
    method._enqueue = None  # the banks stay as checkpointed
    terms = split_terms(rec, out, ctx.cfg.cocal)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, (t, _, _) in terms.items():  # unweighted gradients (the weights scale the norms below)
        g = torch.autograd.grad(t, flat, retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(flat, g)]
        grads[name] = {n: torch.cat([g[index[id(p)]].float().reshape(-1) for _, p in groups[n]]) for n in names}
    weighted = {n: {k: w * grads[n][k] for k in names} for n, (_, w, _) in terms.items()}
    weighted["total"] = {k: sum(weighted[n][k] for n in terms) for k in names}

    def cos(a, b):
        a, b = a.double(), b.double()
        d = a.norm() * b.norm()
        return float(a @ b / d) if d > 0 else None

    ref = grads["L_kMaX"]
    rows = {}
    for name in list(terms) + ["total"]:
        g = weighted[name]
        raw = grads.get(name, g)  # direction of the term itself, also when its weight is 0
        row = {"value": float(terms[name][0].detach()) if name != "total" else float(out["loss"].detach()),
               **({"weight": terms[name][1]} if name != "total" else {}),
               **{f"grad_{k}": float(g[k].norm()) for k in names},
               "cos_trunk_kmax": cos(raw["trunk"], ref["trunk"]),
               **{f"cos_{k}_kmax": cos(raw[k], ref[k]) for k in names}}
        kmax_trunk = float(weighted["L_kMaX"]["trunk"].norm())
        row["trunk_over_kmax"] = row["grad_trunk"] / kmax_trunk if kmax_trunk > 0 else None
        if name in terms and terms[name][2] is not None:
            row.update(floor_stats(terms[name][2], tol))
        rows[name] = row
    return rows


# --------------------------------------------------------------------------- one run
def measure_run(run_dir: Path, args) -> dict:
    from labelwise.engine import api
    from labelwise.engine.data import to_device
    from labelwise.engine.method import StepContext

    run, cfg, step, path = load(run_dir, args.checkpoint, args.device, args.set)
    method, model, state = run.method, run.model, run.state
    dev = next(model.parameters()).device
    batches = fixed_batches(method, cfg, api.read_run(run_dir)["data"], run.info, args.batches, args.seed)
    amp = cfg.train.amp
    if amp == "fp16" and dev.type != "cuda":
        raise SystemExit("train.amp is fp16: pass --device cuda (the trainer refuses fp16 on the CPU)")
    ctx = StepContext(cfg=cfg, info=run.info, step=step, max_steps=cfg.train.max_steps, epoch=0, steps_per_epoch=1,
                      device=dev, module=model, state=state, run_dir=run_dir, data_spec=api.read_run(run_dir)["data"])
    groups = param_groups(model)
    model.train()
    per_batch = []
    for bi, batch in enumerate(batches):
        autocast = contextlib.nullcontext() if amp == "none" else torch.autocast(
            dev.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(args.seed * 1_000_003 + bi)
            with autocast:
                per_batch.append(measure_batch(method, model, to_device(batch, dev), ctx, groups, args.floor_tol))
        model.zero_grad(set_to_none=True)
    names = list(per_batch[0])
    def avg(vals):  # None: undefined in that batch (no anchor with a positive, a zero gradient)
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    mean = {n: {k: avg([b[n][k] for b in per_batch]) for k in per_batch[0][n]} for n in names}
    cc = cfg.cocal
    banks = {b: float(getattr(state, b).valid.float().mean()) for b in ("part_bank", "object_bank")}
    return {"run": str(run_dir), "checkpoint": str(path), "step": step, "batches": args.batches,
            "batch_size": cfg.train.batch_size, "seed": args.seed, "set": list(args.set), "floor_tol": args.floor_tol,
            "cocal": {k: getattr(cc, k) for k in ("p_con", "o_con", "logic_loss", "logic_reverse", "similarity",
                                                   "reduction", "tau", "hard_negatives", "logic_hard_negatives",
                                                   "bank_size", "w_kmax", "w_p_con", "w_o_con", "w_logic")},
            "bank_fill": banks, "params": {g: sum(p.numel() for _, p in ps) for g, ps in groups.items()},
            "mean": mean, "per_batch": per_batch}


def table(r: dict) -> str:
    c = r["cocal"]

    def f(v, d=3):
        return "" if v is None else f"{v:.{d}f}"

    lines = [f"Run `{r['run']}`, step {r['step']}, {r['batches']} batches of {r['batch_size']} (seed {r['seed']})"
             + (f", --set {' '.join(r['set'])}" if r["set"] else "")
             + f"; similarity {c['similarity']}, reduction {c['reduction']}, tau {c['tau']}, k {c['hard_negatives']}, "
             f"S {c['bank_size']}; banks filled {r['bank_fill']['part_bank']:.2f} / {r['bank_fill']['object_bank']:.2f}. "
             "Mean over batches; gradient norms of the weighted term; cosines of the term's gradient with L_kMaX's.",
             "",
             "| term | weight | value | grad queries | grad components | grad trunk | trunk / L_kMaX | cos queries | "
             "cos components | cos trunk | at floor | excess over floor | anchors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, m in r["mean"].items():
        lines.append(f"| {n} | {f(m.get('weight'), 2)} | {f(m['value'], 4)} | {f(m['grad_queries'], 4)} | "
                     f"{f(m['grad_components'], 4)} | {f(m['grad_trunk'], 4)} | {f(m['trunk_over_kmax'], 3)} | "
                     f"{f(m['cos_queries_kmax'], 3)} | {f(m['cos_components_kmax'], 3)} | {f(m['cos_trunk_kmax'], 3)} | {f(m.get('at_floor'), 3)} | "
                     f"{f(m.get('excess'), 4)} | {f(m.get('anchors'), 1)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished 'labelwise train cocal' run folders")
    p.add_argument("--checkpoint", default=None, help="checkpoint to measure at (default: each run's last.pt)")
    p.add_argument("--batches", type=int, default=8, help="training batches to average over (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed of the fixed batches (default 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--floor-tol", type=float, default=0.01, help="'at floor': per-anchor loss - log|B(x)| <= this")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="cocal.KEY=VALUE",
                   help="loss settings to evaluate instead of the run's (cocal.* except cocal.dictionary)")
    p.add_argument("--md", default=None, help="write the markdown tables here")
    p.add_argument("--json", default=None, help="write the results (with per-batch values) here")
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error("--batches must be >= 1")
    results = [measure_run(r, args) for r in args.runs]
    text = "\n\n".join(table(r) for r in results)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results}, indent=2) + "\n")
    return {"runs": results, "markdown": text}


if __name__ == "__main__":
    main()
