"""Training-step benchmark: emorl's k-SCST step vs TRL's GRPOTrainer, and K=3 adapters together vs sequential.

    python bench/train_step.py            # everything, each configuration in its own process (peak RSS)
    python bench/train_step.py --steps 4 --only ours
    python bench/train_step.py --quick --out DIR   # smoke run: our step on the tiny random model, 2 steps

Setup (issue 2 / anchor-measurements.md): SmolLM2-135M-Instruct fp32 on CPU, LoRA r=8 alpha=32 dropout 0.05 on
q,k,v,o,gate,up,down; 8 prompts x k=3 replies x exactly 48 new tokens (min_new_tokens=48); step time = median of
steps 2..N (step 1 warms up); peak RSS = ru_maxrss of the process (includes loading the model).
K=3 comparison: the default preset's step shape (4 prompts x k=2 x 32 tokens), 3 objectives trained together in
one Trainer vs one after another (same process, model loaded once, so only training work is compared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
SYSTEM = "You are a warm, supportive listener. Reply to the person in one or two sentences."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUICK = ["model.name=tiny-llama", "train.generation.max_new_tokens=4", "train.generation.min_new_tokens=4"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def length_reward(prompts, completions, **kw):  # TRL signature; cheap so the step is what is timed
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 / (1.0 + abs(len(t.split()) - 20) / 10) for t in texts]


def statements(n: int) -> list[str]:
    from emorl.data import default_records

    return [r.prompt for r in default_records()[:n]]


def run_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from emorl.models import smollm2_dir

    torch.manual_seed(0)
    path = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": s}]}
                            for s in statements(16) * 2])
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    args = GRPOConfig(output_dir="/tmp/emorl-bench-trl", per_device_train_batch_size=24, num_generations=3,
                      max_completion_length=48, generation_kwargs={"min_new_tokens": 48}, use_cpu=True, bf16=False,
                      report_to=[], save_strategy="no", logging_steps=1, max_steps=steps, learning_rate=1e-6, seed=0)
    tr = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=ds, processing_class=tok,
                     peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS),
                     callbacks=[Timer()])
    tr.train()
    return {"step_s": times, "peak_rss_mib": peak_rss_mib()}


def _ours_cfg(objectives: list[str], batch: int, k: int, tokens: int, steps: int, micro: int, *extra: str):
    from emorl.config import load_config

    objs = "{" + ", ".join(f"{o}: {{type: length, target: 20}}" for o in objectives) + "}"
    return load_config("default", [
        f"objectives={objs}", f"train.batch_size={batch}", f"train.k={k}", f"train.max_steps={steps}",
        f"train.generation.max_new_tokens={tokens}", f"train.generation.min_new_tokens={tokens}",
        "train.generation.top_k=0", "train.val_every=1000", "train.val_prompts=1", "train.val_samples=1",
        "train.checkpoint_every=1000", f"train.micro_batch_size={micro}", "train.lr=1e-6",
        "train.convergence_threshold=0", f"lora.target_modules=[{', '.join(TARGETS)}]", "front.sweep=[]",
        f"model.system_prompt={json.dumps(SYSTEM)}", *extra, *(QUICK if "--quick" in sys.argv else [])])


def run_ours(steps: int, micro: int) -> dict:
    import torch

    from emorl.train.trainer import Trainer

    torch.manual_seed(0)
    cfg = _ours_cfg(["length"], 8, 3, 48, steps, micro)
    tr = Trainer(cfg, f"/tmp/emorl-bench-ours-{os.getpid()}", progress=False, force=True)
    tr.train()
    return {"step_s": [s["step_s"] for s in tr.step_times], "rollout_s": [s["rollout_s"] for s in tr.step_times],
            "update_s": [s["update_s"] for s in tr.step_times], "peak_rss_mib": peak_rss_mib()}


def run_k3(steps: int) -> dict:
    import torch

    from emorl.models import load_base
    from emorl.train.trainer import Trainer

    torch.manual_seed(0)
    objs = ["a_len", "b_len", "c_len"]
    base = load_base(_ours_cfg(objs, 4, 2, 32, steps, 8).model)
    out = {}
    t = time.perf_counter()
    tr = Trainer(_ours_cfg(objs, 4, 2, 32, steps, 8), f"/tmp/emorl-bench-k3-{os.getpid()}", base=base,
                 progress=False, force=True)
    tr.train()
    out["together_s"] = sum(s["step_s"] for s in tr.step_times)
    out["together_wall_s"] = time.perf_counter() - t
    out["together_rollout_s"] = sum(s["rollout_s"] for s in tr.step_times)
    t = time.perf_counter()
    tr = Trainer(_ours_cfg(objs, 4, 2, 32, steps, 24, "train.joint_update=true"), f"/tmp/emorl-bench-k3j-{os.getpid()}",
                 base=base, progress=False, force=True)
    tr.train()
    out["joint_s"] = sum(s["step_s"] for s in tr.step_times)
    out["joint_wall_s"] = time.perf_counter() - t
    out["joint_rollout_s"] = sum(s["rollout_s"] for s in tr.step_times)
    seq, seq_wall = 0.0, 0.0
    for o in objs:
        t = time.perf_counter()
        tr = Trainer(_ours_cfg([o], 4, 2, 32, steps, 8), f"/tmp/emorl-bench-k3s-{os.getpid()}", base=base,
                     progress=False, force=True)
        tr.train()
        seq += sum(s["step_s"] for s in tr.step_times)
        seq_wall += time.perf_counter() - t
        out.setdefault("sequential_rollout_s", 0.0)
        out["sequential_rollout_s"] += sum(s["rollout_s"] for s in tr.step_times)
    out["sequential_s"], out["sequential_wall_s"] = seq, seq_wall
    return out


def _sub(kind: str, steps: int, micro: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--steps", str(steps), "--micro", str(micro),
           *(["--quick"] if "--quick" in sys.argv else [])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"{kind} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro", type=int, default=6, help="our micro-batch (rows per forward/backward)")
    ap.add_argument("--only", choices=["trl", "ours", "k3"])
    ap.add_argument("--child")
    ap.add_argument("--quick", action="store_true", help="smoke run: our step on the tiny random model, 2 steps")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for train_step.json")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.only = 2, a.only or "quick"
    if a.child:
        import torch

        torch.set_num_threads(2)
        fn = {"trl": lambda: run_trl(a.steps), "ours": lambda: run_ours(a.steps, a.micro),
              "k3": lambda: run_k3(a.steps)}[a.child]
        print(json.dumps(fn()))
        return
    kinds = {None: ["ours", "trl", "k3"], "quick": ["ours"]}.get(a.only, [a.only])
    res = {}
    for k in kinds:
        t = time.perf_counter()
        res[k] = _sub(k, a.steps, a.micro)
        res[k]["process_s"] = time.perf_counter() - t
        print(k, json.dumps(res[k]), flush=True)
    print("\n== summary (median of steps 2..N) ==")
    med = {k: statistics.median(res[k]["step_s"][1:]) for k in ("ours", "trl") if k in res}
    for k, v in med.items():
        extra = ""
        if k == "ours":
            extra = (f" (rollout {statistics.median(res[k]['rollout_s'][1:]):.1f} s + update "
                     f"{statistics.median(res[k]['update_s'][1:]):.1f} s)")
        print(f"{k:>5}: step {v:.1f} s{extra}, peak RSS {res[k]['peak_rss_mib']:.0f} MiB")
    if len(med) == 2:
        print(f"ours / TRL step time: {med['ours'] / med['trl']:.2f} (target <= 0.6)")
        print(f"ours / TRL peak RSS: {res['ours']['peak_rss_mib'] / res['trl']['peak_rss_mib']:.2f} (target <= 0.5)")
    if "k3" in res:
        r = res["k3"]
        for key, label in (("together", "batched rollouts, separate updates"), ("joint", "batched rollouts + joint "
                                                                                          "update")):
            print(f"K=3 together ({label}) {r[key + '_s']:.1f} s vs sequential {r['sequential_s']:.1f} s of steps: "
                  f"{r[key + '_s'] / r['sequential_s']:.2f} (target <= 0.6); with validation/saving: "
                  f"{r[key + '_wall_s'] / r['sequential_wall_s']:.2f}; rollouts {r[key + '_rollout_s']:.1f} s vs "
                  f"{r['sequential_rollout_s']:.1f} s")
    print(f"load average: {os.getloadavg()}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "train_step.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
