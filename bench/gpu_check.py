"""The project's GPU check in one run: ``bash bench/gpu_check.sh [OUT]`` calls this file.

On one CUDA GPU, in under 8 minutes, it measures the following and writes them to
``OUT/gpu_results.json`` (default ``bench/gpu_results.json``):

1. ``train:METHOD:PRESET``: each method's paper preset trained through the real trainer
   (``labelwise.engine.api.train``) on a testbed made by ``labelwise data synth``, at the
   preset's crop size and batch size. By default one preset per method runs: the first of voc /
   coco / pascalpart / partimagenet it has. ``--all-presets`` runs every non-``cpu`` preset.
   Each preset trains twice, in fp32 (``train.amp=none``) and with bf16 autocast
   (``train.amp=bf16``). Recorded per run: the median step time after the warm-up steps,
   ``torch.cuda.max_memory_allocated`` over the run, and whether every logged loss is finite.
   No pretrained ViT / ResNet weights exist offline, so every ``model.*pretrained`` key the
   preset turns on is set to false. The weights start random, and the JSON lists those keys.
   A run that runs out of GPU memory is retried at half the images per forward, at most
   twice. The method accumulates the rest where it can; otherwise the batch is halved. The
   JSON records each retry.
2. ``infer:cam`` and ``infer:oap``: the engine of ``labelwise infer`` on a trained run, at
   batch 1 and at ``infer.batch_size`` > 1, with images/s for each. Only the predict loop is
   timed (decoding, forward, writing); loading the model is not. The cam call on the train
   split writes the seeds that ``irn`` trains on.
3. ``bench:oap``: ``labelwise bench oap --device cuda``. It times OAP's static sync-free path
   on the GPU (a batch at 56 x 56 tokens) and MaskCut's dense ``eigh`` on the CPU, and gives
   their ratio (the paper's Table 1 says x105).
4. ``tests:oap-static``: the static path's CUDA tests. They run with the sync-debug mode set to
   "error" around the layer loop, and check that the GPU masks equal the CPU masks.

This covers ``bench/oap_gpu_check.sh`` (checks 3 and 4) and ``bench/oap_train_gpu_check.sh``
(the oap coco preset's step in bf16, and a trained OAP run predicting on CUDA).

Every check runs in its own process under a time limit. A failing check is recorded with its
one-line error, and the next check runs. ``gpu_results.json`` is rewritten after every
check, so a killed run keeps what it had measured. ``--budget-s`` (default 470) bounds the whole
run: no check may run past it, and a check that would start after it is recorded as skipped.

``--dry-run`` (or ``GPU_CHECK_DRY_RUN=1``) runs the same code on the CPU at tiny sizes: 64 px
testbeds and crops, batch 2, one warm-up step and one timed step, and CPU bf16 autocast for the
bf16 run. It writes the same JSON structure. CI runs it in tests/test_gpu_check.py.

Child processes re-run this file with ``--child JOB.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_NAME = "gpu_results.json"
LOGS_NAME = "gpu_check_logs"
REPO = Path(__file__).resolve().parent.parent

# which testbed each method trains on (what its labels need), and the data format it is read as
METHOD_TESTBED = {"cam": "cooc", "seco": "cooc", "cobra": "cooc", "irn": "cooc", "segmenter": "cooc",
                  "oap": "objects", "kmax": "parts", "cocal": "parts"}
TESTBED_FORMAT = {"cooc": "voc", "objects": "coco", "parts": "parts"}
# the one paper preset per method run by default: the first of these the method has
PRESET_ORDER = ("voc", "coco", "pascalpart", "partimagenet")
# training order: cam first (its seeds feed irn), the largest models last
METHOD_ORDER = ("cam", "irn", "seco", "cobra", "segmenter", "oap", "kmax", "cocal")
# inference checks: method -> the output timed; the run read is that method's bf16 run
INFER_OUTPUTS = {"cam": "seeds", "oap": "universal"}
# a method that trains on another's seeds -> that method (its inference check writes them)
SEEDS_FROM = {"irn": "cam"}

# Every loss on from the first step: the step the paper trains with for most of its schedule
# (the presets stage some losses in after hundreds of steps).
ALL_LOSSES_ON = {"seco": ["loss.stage_contrast=0", "loss.stage_seg=0", "seco.proto_start=0"],
                 "cobra": ["loss.cam_start_epoch=0", "loss.contrast_start_epoch=0"]}
# CPU work kept out of a GPU step: IRN's IR labels run a dense CRF per image in the DataLoader
# (about 1 s per 512 px image on one core; `labelwise bench crf` times it) and would time the CPU.
CPU_SIDE_OFF = {"irn": ["irn.ir_crf=false"]}
# Measurement settings of every training check: no evaluation, a loss record per step, no
# checkpoint inside the timed steps.
MEASURE = ["train.eval_at_end=false", "train.eval_every=0", "train.log_every=1", "train.ckpt_every=1000000"]
# --dry-run: tiny sizes. The views, crops and sampled points that the presets size for 448-512 px
# crops are scaled down with the 64 px crop.
DRY_SIZES = {"*": ["data.crop_size=64", "train.batch_size=2", "train.num_workers=0", "infer.num_workers=0"],
             "seco": ["seco.local_size=16", "seco.n_local=2", "seco.par_size=32"],
             "oap": ["oap.global_size=64", "oap.local_size=32", "loss.num_points=256", "loss.match_points=256",
                     "infer.size=64"],
             "irn": ["loss.radius=3"]}     # pairs of radius 10 need a 10 x 19 grid; 64 px crops give 16 x 16
PRECISIONS = {"fp32": "none", "bf16": "bf16"}     # run name -> train.amp
MAX_OOM_RETRIES = 2
PAPER_MASKCUT_OVER_OAP = 4.72 / 0.045              # OAP Table 1: MaskCut 4.72 s, OAP 0.045 s per image


class CheckError(Exception):
    """A check failed; the message is the one line recorded for it."""


def one_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    if type(exc).__name__ in ("CheckError", "LabelwiseError"):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def file_name(check_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", check_name)


# ============================================================================ settings and plan
def settings(dry_run: bool) -> dict:
    """Sizes of one mode: on the GPU the presets' own crops and batches, and the tiny CPU dry run."""
    if dry_run:
        return {"device": "cpu", "warmup": 1, "steps": 1, "least_timed": 1, "run_budget_s": 60.0, "train_images": 4,
                "val_images": {"cooc": 2, "objects": 2}, "infer_batch": 2, "check_limit_s": 300.0,
                "bench_oap": ["--grids", "4", "--threads", "1", "--passes", "1", "--speed-images", "1",
                              "--size", "64", "--train", "1", "--val", "2"]}
    # train images: 4 batches of the largest batch on the testbed (testbed_sizes); val images:
    # what the inference checks predict; 10 timed steps, or as many as fit in 12 s (at least 3)
    return {"device": "cuda", "warmup": 2, "steps": 10, "least_timed": 3, "run_budget_s": 12.0,
            "train_images": None, "val_images": {"cooc": 32, "objects": 16}, "infer_batch": 8,
            "check_limit_s": 150.0,
            "bench_oap": ["--grids", "56", "--threads", "all", "--passes", "3", "--speed-images", "1",
                          "--train", "1", "--val", "16", "--gpu-batch", "16"]}


def paper_presets(method, all_presets: bool) -> list[str]:
    names = [p for p in method.presets() if p != "cpu"]
    ordered = [p for p in PRESET_ORDER if p in names] + [p for p in names if p not in PRESET_ORDER]
    return ordered if all_presets else ordered[:1]


def plan(methods: list[str] | None = None, all_presets: bool = False, dry_run: bool = False) -> list[dict]:
    """The checks of a run, in order: one training check per (method, paper preset), each
    inference check after the run it reads, and the OAP bench and tests right after cam (they are
    cheap, so a spent budget never costs them)."""
    from labelwise.config import to_dict
    from labelwise.engine.api import resolve_method_config
    from labelwise.engine.registry import BUILTIN_METHODS, get_method

    # the project's own methods: the registry may also hold methods registered at run time
    # (plugins, the test suite's toy method), which have no testbed here
    known = sorted(BUILTIN_METHODS)
    chosen = known if methods is None else methods
    bad = [m for m in chosen if m not in known]
    if bad:
        raise CheckError(f"--methods {','.join(bad)}: not a method here; choose from {', '.join(known)}")
    untested = [m for m in known if m not in METHOD_TESTBED]
    if untested:
        raise CheckError(f"method {untested[0]} has no testbed; add it to METHOD_TESTBED in bench/gpu_check.py")
    for m in chosen:
        if m in SEEDS_FROM and SEEDS_FROM[m] not in chosen:
            raise CheckError(f"--methods: {m} trains on the seeds of {SEEDS_FROM[m]}; add {SEEDS_FROM[m]}")
    sizes = settings(dry_run)
    oap_checks = [{"name": "bench:oap", "kind": "bench_oap"}, {"name": "tests:oap-static", "kind": "pytest"}]
    checks: list[dict] = []
    for name in [m for m in METHOD_ORDER if m in chosen] + sorted(m for m in chosen if m not in METHOD_ORDER):
        method = get_method(name)
        presets = paper_presets(method, all_presets)
        if not presets:
            raise CheckError(f"method {name} has no paper preset, only cpu, in src/labelwise/configs/{name}/")
        for preset in presets:
            cfg = to_dict(resolve_method_config(method, preset))
            # hub weights do not exist offline: every pretrained switch the preset turns on goes off
            no_weights = [f"model.{k}" for k, v in sorted(cfg["model"].items()) if k.endswith("pretrained") and v]
            sets = ([f"{k}=false" for k in no_weights] + ALL_LOSSES_ON.get(name, []) + CPU_SIDE_OFF.get(name, [])
                    + MEASURE + [f"train.device={sizes['device']}"])
            if dry_run:
                sets += DRY_SIZES["*"] + DRY_SIZES.get(name, [])
            run_cfg = to_dict(resolve_method_config(method, preset, overrides=sets))  # also checks every key
            checks.append({"name": f"train:{name}:{preset}", "kind": "train", "method": name, "preset": preset,
                           "testbed": METHOD_TESTBED[name], "overrides": sets,
                           "crop_size": run_cfg["data"]["crop_size"], "batch_size": run_cfg["train"]["batch_size"],
                           "accumulates": method.supports_accumulation, "pretrained_off": no_weights})
            if name in INFER_OUTPUTS and preset == presets[0]:
                checks.append({"name": f"infer:{name}", "kind": "infer", "method": name, "run_of": checks[-1]["name"],
                               "testbed": METHOD_TESTBED[name], "what": INFER_OUTPUTS[name],
                               "seeds_for": [m for m, src in SEEDS_FROM.items() if src == name and m in chosen]})
        if name == "cam":
            checks += oap_checks
    if "cam" not in chosen:
        checks += oap_checks
    return checks


def testbed_sizes(checks: list[dict], sizes: dict) -> dict[str, dict]:
    """Per testbed kind in use: the image side (the largest crop trained on it) and the train / val
    counts. On the GPU, train holds 4 batches of the largest batch: the DataLoader restarts its
    workers each epoch, and the first batch of an epoch waits on one worker, so 3 of 4 steps are
    steady."""
    out: dict[str, dict] = {}
    for c in checks:
        if c["kind"] == "train":
            t = out.setdefault(c["testbed"], {"size": 0, "train": 0, "val": 0})
            t["size"] = max(t["size"], c["crop_size"])
            t["train"] = max(t["train"], sizes["train_images"] or 4 * c["batch_size"])
    for c in checks:  # an inference check predicts the val split of its run's testbed
        if c["kind"] == "infer" and c["testbed"] in out:
            out[c["testbed"]]["val"] = sizes["val_images"][c["testbed"]]
    return out


# ============================================================================ child: one training check
class StopRun(Exception):
    """Raised by the step timer once the timed steps are done. The trainer stops there, so no final
    checkpoint is written inside a timed step."""


class StepTimer:
    """Trainer hook. It times every step after ``warmup`` untimed ones, synchronising CUDA so that
    each step's time is its own. It stops the run after ``steps`` timed steps, or earlier once
    ``budget_s`` of timed steps is spent and at least ``least`` steps were timed. With ``save``
    it writes the checkpoint first, so that the run can be loaded for inference."""

    def __init__(self, device, warmup: int, steps: int, least: int, budget_s: float, save: bool):
        self.device, self.warmup, self.steps, self.least = device, warmup, steps, least
        self.budget_s, self.save = budget_s, save
        self.times: list[float] = []
        self._last = time.perf_counter()

    def __call__(self, trainer, step: int) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if step > self.warmup:
            self.times.append(now - self._last)
        self._last = now
        if len(self.times) >= self.steps or (len(self.times) >= self.least and sum(self.times) >= self.budget_s):
            if self.save:
                trainer.save()
            raise StopRun


def reset_memory(device) -> None:
    import gc

    import torch

    gc.collect()  # the previous run's trainer, and an out-of-memory traceback's frames
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    import resource

    import torch

    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2 ** 20,
                "peak_mem_source": "torch.cuda.max_memory_allocated over the run (reserved: max_memory_reserved)"}
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10, "peak_reserved_mb": None,
            "peak_mem_source": "peak resident set size of the process so far (CPU: includes the earlier run)"}


def logged_losses(run_dir: Path) -> list[float]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(r["loss"]) for r in records if "loss" in r]


def train_once(job: dict, precision: str, device) -> dict:
    """One precision of one training check. An out-of-memory error at the paper's batch halves the
    images per forward and tries again."""
    import torch

    from labelwise.engine import api

    batch = per_forward = job["batch_size"]
    oom_at: list[dict] = []
    while True:
        sets = job["overrides"] + [f"train.amp={PRECISIONS[precision]}", f"train.batch_size={batch}"]
        if per_forward != batch:
            sets.append(f"train.batch_per_gpu={per_forward}")
        run_dir = Path(job["work"]) / f"{precision}-{len(oom_at)}"
        timer = StepTimer(device, job["warmup"], job["steps"], job["least_timed"], job["run_budget_s"],
                          save=job["save"] and precision == "bf16")
        reset_memory(device)
        error = None
        try:  # steps: one more than the hook lets run, so the trainer never ends (and saves) by itself
            api.train(job["method"], job["spec"], run_dir, preset=job["preset"],
                      steps=job["warmup"] + job["steps"] + 1, overrides=sets, seeds=job["seeds"], hooks=[timer],
                      show_progress=False)
        except StopRun:
            pass
        except torch.cuda.OutOfMemoryError as e:
            error = "out of memory: " + one_line(e)
        except Exception as e:  # recorded, not raised: the other precision still runs
            error = one_line(e)
        if error and error.startswith("out of memory") and len(oom_at) < MAX_OOM_RETRIES and per_forward > 1:
            oom_at.append({"batch_size": batch, "per_forward": per_forward})
            if job["accumulates"]:
                per_forward //= 2                  # the same batch per step, the rest accumulated
            else:                                  # the method updates its state per forward: a smaller batch
                batch = per_forward = batch // 2
            continue
        break
    losses = logged_losses(run_dir)
    out = {"ok": False, "error": None, "amp": PRECISIONS[precision], "batch_size": batch, "per_forward": per_forward,
           "oom_at": oom_at, "warmup_steps": job["warmup"], "timed_steps": len(timer.times),
           "ms_per_step": None, "ms_per_step_min": None, "ms_per_step_max": None, "images_per_s": None,
           "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
           # the trainer stops at a non-finite loss before logging it ("... became non-finite ...")
           "loss_finite": bool(losses) and all(math.isfinite(v) for v in losses)
           and "non-finite" not in (error or ""), **peak_memory(device),
           "run_dir": str(run_dir)}
    if timer.times:
        median = statistics.median(timer.times)
        out.update(ms_per_step=1000 * median, ms_per_step_min=1000 * min(timer.times),
                   ms_per_step_max=1000 * max(timer.times), images_per_s=batch / median)
    if error is None and not out["loss_finite"]:
        error = "a logged loss is not finite" if losses else "no loss was logged"
    if error is None and not timer.times:
        error = "no step was timed"
    out["ok"], out["error"] = error is None, error
    return out


def child_train(job: dict) -> None:
    import torch

    device = torch.device(job["device"])
    result: dict = {"device": device_facts(device), "runs": {}}
    for precision in PRECISIONS:
        result["runs"][precision] = train_once(job, precision, device)
        write_json(Path(job["result"]), result)   # after each run: a killed child keeps the first one


# ============================================================================ child: inference, batch 1 vs batched
def child_infer(job: dict) -> None:
    """Calls ``api.infer`` (what ``labelwise infer`` runs) three times. The first call predicts the
    train split at the batch size: it is the warm-up, and for cam it writes the seeds irn trains on.
    Then the val split is predicted at batch 1 and batched. images/s = images / wall time of the
    engine's predict loop. ``run_predict`` is wrapped so that loading the checkpoint is not counted."""
    import torch

    import labelwise.engine.predict as predict
    from labelwise.engine import api

    device = torch.device(job["device"])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timings: list[tuple[float, int]] = []
    engine_loop = predict.run_predict

    def timed_run_predict(*a, **kw):
        sync()
        t0 = time.perf_counter()
        res = engine_loop(*a, **kw)
        sync()
        timings.append((time.perf_counter() - t0, int(res["predicted"])))
        return res

    predict.run_predict = timed_run_predict     # api.infer imports it from the module at call time
    result: dict = {"device": device_facts(device), "calls": {}}
    for name, split, batch in (("train_batched", "train", job["batch"]), ("val_batch_1", "val", 1),
                               ("val_batched", "val", job["batch"])):
        out = Path(job["seeds_out"] if name == "train_batched" and job["seeds_out"] else Path(job["work"]) / name)
        api.infer(job["run"], job["spec"], split, out, what=job["what"], device=str(device),
                  overrides=[f"infer.batch_size={batch}"], show_progress=False)
        wall, images = timings[-1]
        result["calls"][name] = {"split": split, "batch_size": batch, "images": images, "wall_s": wall,
                                 "images_per_s": images / wall}
        write_json(Path(job["result"]), result)


def device_facts(device) -> dict:
    """The name and memory of the device. The children ask, so that the parent never opens a CUDA
    context: a GPU in exclusive-process mode would then refuse the children theirs."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device_name": props.name, "gpu_memory_gb": props.total_memory / 2 ** 30}
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
             if ln.startswith("model name")] if cpuinfo.is_file() else []
    return {"device_name": (names[0] if names else platform.processor()) or "cpu", "gpu_memory_gb": None}


# ============================================================================ parent: running the checks
class Runner:
    def __init__(self, args, out: Path, work: Path, sizes: dict):
        self.args, self.work, self.sizes = args, work, sizes
        self.logs = out / LOGS_NAME
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.env = {**os.environ, "LABELWISE_NO_PROGRESS": "1"}
        if (REPO / "src" / "labelwise").is_dir():  # the working tree's labelwise, installed or not
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
        self.specs: dict[str, str] = {}          # testbed kind -> data spec
        self.runs: dict[str, str] = {}           # training check -> its bf16 run folder
        self.seeds: dict[str, str] = {}          # method -> the seeds folder written for it
        self.facts: dict = {}                    # device name and memory, as a child saw them

    def remaining(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def limit(self) -> float:
        """Seconds the next check may take; a CheckError once the budget is spent."""
        left = self.remaining()
        if left < 15:
            raise CheckError(f"skipped: the time budget was spent (--budget-s {self.args.budget_s:g})")
        return min(self.sizes["check_limit_s"], left)

    def log_path(self, name: str) -> Path:
        return self.logs / f"{file_name(name)}.log"

    def call(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        """Run ``cmd`` with its output in the check's log. A time-out or a failure raises a
        CheckError that carries the last line the process wrote."""
        log, timeout = self.log_path(name), self.limit()
        with open(log, "w") as fh:
            try:
                r = subprocess.run(cmd, env=env or self.env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                   timeout=timeout)
            except subprocess.TimeoutExpired:
                raise CheckError(f"timed out after {timeout:.0f} s (log: {log})") from None
        if r.returncode != 0:
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            raise CheckError(f"exit code {r.returncode}: {lines[-1] if lines else 'no output'} (log: {log})")

    def child(self, name: str, job: dict) -> dict:
        """Run ``job`` in a child process of this file, and return what it wrote, also when it died."""
        job_path = self.work / f"{file_name(name)}.job.json"
        result_path = self.work / f"{file_name(name)}.result.json"
        write_json(job_path, {**job, "result": str(result_path)})
        error = None
        try:
            self.call(name, [sys.executable, str(Path(__file__).resolve()), "--child", str(job_path)])
        except CheckError as e:
            error = str(e)
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        facts = result.pop("device", {})
        self.facts = self.facts or facts
        if error:
            result["error"] = error
        return result

    def spec(self, kind: str) -> str:
        if kind not in self.specs:
            raise CheckError(f"the {kind} testbed was not made (see the testbeds check)")
        return self.specs[kind]

    # ---------------------------------------------------------------- the checks
    def testbeds(self, checks: list[dict]) -> dict:
        """``labelwise data synth`` for each testbed kind in use, up to ``--jobs`` at once."""
        wanted = testbed_sizes(checks, self.sizes)
        t0 = time.perf_counter()
        pending, running, errors = sorted(wanted), [], []
        try:
            while pending or running:
                while pending and len(running) < self.args.jobs:
                    kind = pending.pop(0)
                    t, log = wanted[kind], self.log_path(f"synth_{kind}")
                    cmd = [sys.executable, "-m", "labelwise", "data", "synth", kind, str(self.work / "data" / kind),
                           "--train", str(t["train"]), "--val", str(t["val"]), "--size", str(t["size"]),
                           "--no-progress"]
                    with open(log, "w") as fh:
                        running.append((kind, log, subprocess.Popen(cmd, env=self.env, stdout=fh,
                                                                    stderr=subprocess.STDOUT)))
                kind, log, proc = running.pop(0)
                if proc.wait(timeout=max(self.remaining(), 1)) != 0:
                    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
                    errors.append(f"{kind}: {lines[-1] if lines else 'no output'}")
                else:
                    self.specs[kind] = f"{TESTBED_FORMAT[kind]}:{self.work / 'data' / kind}"
        except subprocess.TimeoutExpired:
            errors.append(f"not done within the time budget (--budget-s {self.args.budget_s:g})")
        finally:
            for _, _, proc in running:
                proc.kill()
        if errors:
            raise CheckError("labelwise data synth failed: " + "; ".join(errors))
        return {"wall_s": time.perf_counter() - t0,
                "testbeds": {k: {**wanted[k], "spec": self.specs[k]} for k in wanted}}

    def train(self, check: dict) -> dict:
        name = check["method"]
        if name in SEEDS_FROM and name not in self.seeds:
            raise CheckError(f"{name} trains on the seeds of check infer:{SEEDS_FROM[name]}, which wrote none")
        job = {"kind": "train", "method": name, "preset": check["preset"], "spec": self.spec(check["testbed"]),
               "seeds": self.seeds.get(name), "overrides": check["overrides"], "batch_size": check["batch_size"],
               "accumulates": check["accumulates"], "warmup": self.sizes["warmup"], "steps": self.sizes["steps"],
               "least_timed": self.sizes["least_timed"], "run_budget_s": self.sizes["run_budget_s"],
               "device": self.sizes["device"], "work": str(self.work / "runs" / file_name(check["name"])),
               "save": name in INFER_OUTPUTS}
        res = self.child(check["name"], job)
        runs = {p: res.get("runs", {}).get(p, {"ok": False, "error": "not run"}) for p in PRECISIONS}
        out = {"method": name, "preset": check["preset"], "testbed": check["testbed"],
               "crop_size": check["crop_size"], "batch_size": check["batch_size"], "overrides": check["overrides"],
               "pretrained_off": check["pretrained_off"],
               "weights": (f"random initial weights: no pretrained weights offline "
                           f"({', '.join(check['pretrained_off'])} set to false)" if check["pretrained_off"]
                           else "as the preset: it asks for none"),
               "runs": runs, "bf16_speedup": None}
        if runs["fp32"].get("ms_per_step") and runs["bf16"].get("ms_per_step"):
            out["bf16_speedup"] = runs["fp32"]["ms_per_step"] / runs["bf16"]["ms_per_step"]
        if runs["bf16"].get("ok") and name in INFER_OUTPUTS:
            self.runs[check["name"]] = runs["bf16"]["run_dir"]
        failed = [f"{p}: {r['error']}" for p, r in runs.items() if not r.get("ok") and r["error"] != "not run"]
        if "error" in res or failed:
            out["error"] = "; ".join(failed + ([res["error"]] if "error" in res else []))
        return out

    def infer(self, check: dict) -> dict:
        run = self.runs.get(check["run_of"])
        if run is None:
            raise CheckError(f"needs the bf16 run of check {check['run_of']}, which did not finish")
        seeds_out = str(self.work / "seeds" / check["method"]) if check["seeds_for"] else None
        job = {"kind": "infer", "run": run, "spec": self.spec(check["testbed"]), "what": check["what"],
               "batch": self.sizes["infer_batch"], "device": self.sizes["device"], "seeds_out": seeds_out,
               "work": str(self.work / "pred" / file_name(check["name"]))}
        res = self.child(check["name"], job)
        calls = res.get("calls", {})
        out = {"method": check["method"], "run": f"{check['run_of']}, bf16 run", "what": check["what"],
               "calls": calls, "batched_over_batch_1": None,
               "timed": "the engine's predict loop (decoding, forward, writing); model loading excluded"}
        if "val_batch_1" in calls and "val_batched" in calls:
            out["batched_over_batch_1"] = calls["val_batched"]["images_per_s"] / calls["val_batch_1"]["images_per_s"]
        if seeds_out and "train_batched" in calls:
            self.seeds.update({m: seeds_out for m in check["seeds_for"]})
        if "error" in res:
            out["error"] = res["error"]
        return out

    def bench_oap(self, check: dict) -> dict:
        path = self.logs / "bench_oap.json"
        dev = self.sizes["device"]
        args = ["--device", dev, "--content", "smooth", "--photos", "", "--no-quality", "--no-progress",
                "--json", str(path), *self.sizes["bench_oap"]]
        self.call(check["name"], [sys.executable, "-m", "labelwise", "bench", "oap", *args])
        res = json.loads(path.read_text())
        grid = max(res["protocol"]["settings"]["grids"])
        threads = max(res["protocol"]["settings"]["threads"])
        if dev == "cuda":
            gpu = res.get("oap_gpu")
            if not gpu:
                raise CheckError(f"bench oap --device cuda wrote no oap_gpu entry ({path})")
            oap = {"oap_path": f"static batched path on {gpu['gpu']}", "oap_batch": gpu["batch"],
                   "oap_ms_per_image": gpu["ms_per_image"], "oap_ms_per_image_rough": gpu["ms_per_image_rough"]}
        else:  # dry run: OAP on the CPU at batch 1, the grid and threads MaskCut has
            oap = {"oap_path": "CPU, batch 1 (dry run)", "oap_batch": 1,
                   "oap_ms_per_image": res["oap"][f"ms_per_image_{grid}_t{threads}"], "oap_ms_per_image_rough": None}
        maskcut = res["maskcut"][f"ms_per_image_{grid}_t{threads}"]
        return {"command": "labelwise bench oap " + " ".join(a if a else "''" for a in args), "grid": grid, **oap,
                "maskcut_cpu_ms_per_image": maskcut, "maskcut_threads": threads,
                "maskcut_over_oap": maskcut / oap["oap_ms_per_image"], "paper_maskcut_over_oap": PAPER_MASKCUT_OVER_OAP,
                "features_ms_per_image": res["features"]["ms_per_image"], "json": str(path)}

    def pytest(self, check: dict) -> dict:
        """The static path's CUDA tests; its CPU equality tests are in the normal suite.
        CUDA_VISIBLE_DEVICES is passed on explicitly, because the tests' conftest hides every GPU
        when it is unset."""
        args = ["-q", "-p", "no:cacheprovider", "-rs", "tests/test_oap_static.py", "-k", "cuda"]
        env = {**self.env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
        error = None
        try:
            self.call(check["name"], [sys.executable, "-m", "pytest", *args], env=env)
        except CheckError as e:
            error = str(e)
        lines = [ln for ln in self.log_path(check["name"]).read_text().splitlines() if ln.strip()]
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", lines[-1] if lines else "")}
        out = {"command": "python -m pytest " + " ".join(args), "passed": counts.get("passed", 0),
               "failed": counts.get("failed", 0) + counts.get("error", 0), "skipped": counts.get("skipped", 0)}
        if error:
            out["error"] = error
        elif self.sizes["device"] == "cuda" and any("needs a CUDA device" in ln for ln in lines):
            out["error"] = "the CUDA test was skipped: the test process sees no GPU"
        return out


def header(args, sizes: dict) -> dict:
    import torch

    import labelwise

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, text=True, capture_output=True).stdout.strip()
    except OSError:  # no git on the machine
        commit = ""
    return {"script": "bench/gpu_check.py", "mode": "dry-run (CPU, tiny sizes)" if args.dry_run else "gpu",
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "wall_s": 0.0,
            "ok": None, "device": sizes["device"], "device_name": None, "gpu_memory_gb": None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "labelwise": labelwise.__version__,
            # what "fp32" means on an Ampere / Hopper GPU: TF32 matmuls off, TF32 convolutions on (torch's defaults)
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "git_commit": commit or None, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "budget_s": args.budget_s,
            "settings": {k: v for k, v in sizes.items() if k != "bench_oap"},
            "precisions": {p: f"train.amp={a}" for p, a in PRECISIONS.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench"), help=f"folder for {RESULTS_NAME} and {LOGS_NAME}/ "
                                                              "(default: bench/)")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                   help="the same checks on the CPU at tiny sizes (also GPU_CHECK_DRY_RUN=1)")
    p.add_argument("--methods", default=None, help="comma-separated methods to train (default: every method)")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out (names as --list prints them)")
    p.add_argument("--all-presets", action="store_true", help="every non-cpu preset, not one per method (longer)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="no check runs past this many seconds (default 470; dry run 1800)")
    p.add_argument("--jobs", type=int, default=min(3, os.cpu_count() or 1), help="testbeds made at once (default 3)")
    p.add_argument("--keep", action="store_true", help="keep the testbeds and runs (the path is printed)")
    p.add_argument("--list", action="store_true", help="print the planned checks and exit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        job = json.loads(Path(args.child).read_text())
        {"train": child_train, "infer": child_infer}[job["kind"]](job)
        return 0

    from labelwise.errors import LabelwiseError

    def fail(msg: str) -> int:
        print(f"gpu_check: error: {msg}", file=sys.stderr)
        return 2

    try:
        checks = plan(args.methods.split(",") if args.methods else None, args.all_presets, args.dry_run)
    except (CheckError, LabelwiseError) as e:
        return fail(str(e))
    skip = [s for s in args.skip.split(",") if s]
    unknown = [s for s in skip if s not in {c["name"] for c in checks}]
    if unknown:
        return fail(f"--skip {unknown[0]}: no such check; --list prints them")
    checks = [c for c in checks if c["name"] not in skip]
    if args.list:
        for c in checks:
            print(c["name"])
        return 0
    if args.jobs < 1:
        return fail(f"--jobs {args.jobs}: needs at least 1")
    if args.budget_s is not None and args.budget_s <= 0:
        return fail(f"--budget-s {args.budget_s:g}: needs a positive number of seconds")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        return fail("no CUDA device here (torch.cuda.is_available() is False); run on a GPU machine, or pass "
                    "--dry-run for the CPU version")
    args.budget_s = args.budget_s or (1800.0 if args.dry_run else 470.0)
    sizes = settings(args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    runner = Runner(args, out, work, sizes)
    results = {**header(args, sizes), "planned": ["testbeds"] + [c["name"] for c in checks], "checks": {}}
    try:
        for check in [{"name": "testbeds", "kind": "testbeds"}] + checks:
            t0 = time.perf_counter()
            print(f"gpu_check: {check['name']} ...", flush=True)
            try:
                if check["kind"] == "testbeds":
                    entry = runner.testbeds(checks)
                else:
                    runner.limit()  # raises once the budget is spent: the check is recorded as skipped
                    entry = getattr(runner, check["kind"])(check)
            except Exception as e:  # a failing check, or a bug in one, must not lose the others' figures
                entry = {"error": one_line(e)}
            entry = {"ok": "error" not in entry, **entry, "check_wall_s": round(time.perf_counter() - t0, 1)}
            results["checks"][check["name"]] = entry
            results.update({k: v for k, v in runner.facts.items() if results[k] is None})
            results["wall_s"] = round(time.perf_counter() - runner.t0, 1)
            write_json(results_path, results)
            print(f"gpu_check: {check['name']}: {'ok' if entry['ok'] else entry['error']} "
                  f"({entry['check_wall_s']} s)", flush=True)
        results["ok"] = all(c["ok"] for c in results["checks"].values())
        write_json(results_path, results)
    finally:
        if args.keep:
            print(f"gpu_check: testbeds and runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    n_ok = sum(c["ok"] for c in results["checks"].values())
    print(f"gpu_check: wrote {results_path}: {n_ok} of {len(results['checks'])} checks ok in {results['wall_s']} s")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
