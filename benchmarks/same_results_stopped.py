#!/usr/bin/env python
"""Does a stopped and resumed run give the same results in two versions of the trainer? In commit BASE and in the
working tree, a run is stopped by SIGTERM after its 5th game and resumed to its end; the newest <episode>.pth and
every metrics.csv row (wall-clock columns aside) are then compared, as ../shared/bench/same_results.sh compares
uninterrupted runs. Use --envs 1, which resumes exactly; run it from the project's root.

    python benchmarks/same_results_stopped.py 6483ff4 --envs 1 --steps 2500 --memory 1500 --learn-start 200 --seed 4
"""
import csv, glob, os, re, signal, subprocess, sys, tempfile, time
import torch
base, flags = sys.argv[1], sys.argv[2:] + ["--device", "cpu", "--threads", "1"]
tmp = tempfile.mkdtemp()
subprocess.run(["git", "clone", "-q", ".", f"{tmp}/base"], check=True)
subprocess.run(["git", "-C", f"{tmp}/base", "checkout", "-q", base], check=True)
for side, where in (("a", f"{tmp}/base"), ("b", os.getcwd())):
    run = f"{tmp}/{side}"
    p = subprocess.Popen([sys.executable, "train_breakout.py", *flags, "--checkpoints", run], cwd=where,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (os.path.exists(f"{run}/metrics.csv") and open(f"{run}/metrics.csv").read().count("\ngame,") >= 5):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate()[0]
    print(side, [l for l in out.splitlines() if l.startswith("stopped by")])
    r = subprocess.run([sys.executable, "train_breakout.py", "--resume", "--checkpoints", run], cwd=where,
                       capture_output=True, text=True)
    print(side, [l for l in r.stdout.splitlines() if l.startswith(("resumed from", "done:"))])
def newest(run):
    snaps = [f for f in glob.glob(os.path.join(run, "*.pth")) if re.fullmatch(r"\d+\.pth", os.path.basename(f))]
    return max(snaps, key=lambda f: int(os.path.basename(f)[:-4]))
def rows(run):
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "steps_per_s")} for r in csv.DictReader(f)]
a, b = f"{tmp}/a", f"{tmp}/b"
sa, sb = newest(a), newest(b)
wa, wb = (torch.load(s, map_location="cpu", weights_only=True) for s in (sa, sb))
diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
print(f"snapshots: {os.path.basename(sa)} vs {os.path.basename(sb)}; tensors differing: {diff or 'none'}")
ra, rb = rows(a), rows(b)
first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), "none")
print(f"metrics rows: {len(ra)} vs {len(rb)}; first differing row: {first}")
print("same results" if os.path.basename(sa) == os.path.basename(sb) and not diff and ra == rb else "DIFFERENT results")
