"""SLURM helpers for the dependent jobs of ``bin/slurm_masks.sh`` and ``bin/slurm_train.sh``.

* ``sacrum-masks slurm-summary RUN_DIR --shards N [--array-job ID]``: the job that runs after every
  shard of a stage 4 array (``afterany``). It reads each shard's ``predict --report``
  (``RUN_DIR/reports/shard-<I>-of-<N>.json``) and the array's task states, runs the QC report of every
  output folder, prints and writes one summary (``RUN_DIR/summary.txt`` and ``summary.json``): written,
  up to date, kept, failed (and busy) per shard, the failed images by name, the shards that failed and
  why (task state, a missing report). Exit status 1 when any shard or image failed.
* ``sacrum-masks slurm-check-array ID --expect "0 1" [--name "fold {}"]``: the first step of the final
  training job; names every array task that did not complete (a failed fold) and exits 1.

Job states come from ``scontrol show job -o`` (no accounting database is needed; records stay for
``MinJobAge`` seconds after a job ends, 300 by default). ``sbatch --wait`` is not used to judge a job:
it returns 0 for a job cancelled before it started.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click

from .batch import Batch
from .errors import InputError
from .nifti import write_json_atomic, write_text_atomic

#: the per-shard counts of the summary, in order ("busy" is added when a shard has some)
COUNT_ORDER = ["written", "up to date", "kept", "failed"]


def report_path(run_dir: str | Path, shard: int, shards: int) -> Path:
    """Where array task ``shard`` of ``shards`` writes its ``predict --report``."""
    return Path(run_dir) / "reports" / f"shard-{shard}-of-{shards}.json"


def parse_index_list(text: str) -> list[int]:
    """Array task ids as scontrol writes them: ``"0-2,5"``, ``"[1-3%2]"``, ``"4"``.

    >>> parse_index_list("[0-2,5%2]")
    [0, 1, 2, 5]
    """
    text = text.strip("[]").split("%")[0]
    ids: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        ids += list(range(int(lo), int(hi or lo) + 1))
    return ids


def parse_job_records(text: str) -> list[dict[str, str]]:
    """The records of ``scontrol show job -o`` (one line each, ``Key=Value`` tokens).

    >>> recs = parse_job_records("JobId=7 ArrayJobId=5 ArrayTaskId=2 JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0")
    >>> recs[0]["ArrayTaskId"], recs[0]["JobState"], recs[0]["ExitCode"]
    ('2', 'FAILED', '1:0')
    """
    records = []
    for line in text.splitlines():
        if "JobId=" in line:
            records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return records


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o JOB_ID`` parsed (every task of an array); [] when SLURM no longer knows it."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return parse_job_records(proc.stdout)


def task_states(records: list[dict[str, str]]) -> dict[int, dict[str, str]]:
    """Array task id -> its record (a pending or cancelled range record is given to each of its ids)."""
    states = {}
    for rec in records:
        if "ArrayTaskId" in rec:
            for i in parse_index_list(rec["ArrayTaskId"]):
                states[i] = rec
    return states


def describe_task(rec: dict[str, str] | None) -> str:
    """``"COMPLETED"``, ``"FAILED (exit 1:0)"``, ``"CANCELLED (DependencyNeverSatisfied)"``, or unknown."""
    if rec is None:
        return "unknown to SLURM (finished more than MinJobAge ago, or never submitted)"
    state = rec.get("JobState", "?")
    if state == "COMPLETED":
        return state
    why = rec.get("Reason", "None")
    extra = f"exit {rec.get('ExitCode', '?')}" if why in ("None", "NonZeroExitCode") else why
    return f"{state} ({extra})"


def read_report(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("counts"), dict) else None


def summarise(run_dir: str | Path, shards: int, tasks: dict[int, dict[str, str]] | None = None) -> dict:
    """The summary of an array's shards (``tasks``: array task id -> scontrol record, None: not checked).

    Returns a JSON-able dict: ``shards`` (one entry per shard: counts, state, problem), ``totals``,
    ``failed_images`` (``{"image", "reason", "shard"}``), ``failed_shards``, ``folders``, ``exit_status``.
    """
    run_dir = Path(run_dir)
    entries, totals, failed_images, failed_shards, folders = [], {}, [], [], []
    for i in range(1, shards + 1):
        rep = read_report(report_path(run_dir, i, shards))
        state = describe_task(tasks.get(i)) if tasks is not None else None
        problem = None
        if rep is None:
            problem = f"no report (log: {run_dir / 'logs' / f'shard-{i}.log'})"
        elif state is not None and state != "COMPLETED" and rep.get("exit_status") == 0:
            problem = f"task {state}"
        elif rep.get("busy_folder"):
            problem = f"another run held {rep['busy_folder']}: nothing done"
        entry = {"shard": f"{i}/{shards}", "state": state, "counts": rep["counts"] if rep else None,
                 "problem": problem}
        if rep is not None:
            for k, v in rep["counts"].items():
                totals[k] = totals.get(k, 0) + int(v)
            for it in rep.get("items", []):
                if it.get("status") == "failed":
                    failed_images.append({"image": it["item"], "reason": it.get("detail", ""), "shard": entry["shard"]})
            folders += [f for f in rep.get("folders", []) if f not in folders]
        if problem is not None or (rep is not None and rep["counts"].get("failed", 0)):
            failed_shards.append(entry["shard"])
        entries.append(entry)
    return {"run_dir": str(run_dir), "shards": entries,
            "totals": {k: totals.get(k, 0) for k in COUNT_ORDER} | {k: v for k, v in totals.items() if k not in COUNT_ORDER},
            "failed_images": failed_images, "failed_shards": failed_shards, "folders": folders,
            "exit_status": 1 if failed_shards or failed_images else 0}


def _counts_text(counts: dict) -> str:
    keys = COUNT_ORDER + sorted(k for k in counts if k not in COUNT_ORDER and counts[k])
    return ", ".join(f"{counts.get(k, 0)} {k}" for k in keys)


def summary_text(summary: dict, array_job: str | None = None) -> str:
    """The summary as lines for people (see :func:`summarise`)."""
    n = len(summary["shards"])
    head = f"slurm-summary: {summary['run_dir']}" + (f" (array job {array_job}" if array_job else " (")
    lines = [head + f"{', ' if array_job else ''}{n} shards)"]
    for en in summary["shards"]:
        text = f"shard {en['shard']}: " + (_counts_text(en["counts"]) if en["counts"] else "-")
        if en["state"]:
            text += f"  [{en['state']}]"
        if en["problem"]:
            text += f"  FAILED: {en['problem']}"
        lines.append(text)
    if summary["failed_images"]:
        lines.append(f"failed images ({len(summary['failed_images'])}):")
        lines += [f"  {f['image']}: {f['reason']} (shard {f['shard']})" for f in summary["failed_images"]]
    for qc in summary.get("qc", []):
        lines.append(f"QC {qc['folder']}: {qc['result']}")
    total = f"total: {_counts_text(summary['totals'])}"
    if summary["failed_shards"]:
        total += f"; {len(summary['failed_shards'])} of {n} shards failed: " + " ".join(summary["failed_shards"])
    lines.append(total)
    return "\n".join(lines) + "\n"


def run_qc_folders(folders: list[str]) -> list[dict]:
    """The QC report of each output folder; one entry per folder (a QC error is that folder's result)."""
    from .qc import run_qc

    results = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        batch = Batch("qc", stream=sys.stderr)
        try:
            entries, index = run_qc(Path(folder), batch=batch)
        except InputError as exc:
            results.append({"folder": folder, "result": f"failed: {exc.reason}", "ok": False})
            continue
        flagged = sum(1 for en in entries if en.flags)
        results.append({"folder": folder, "ok": batch.exit_code == 0,
                        "result": batch.summary(["written", "up to date", "failed"]) + f" ({flagged} flagged); {index}"})
    return results


@click.command("slurm-summary")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shards", type=click.IntRange(min=1), required=True, help="N, the number of array tasks.")
@click.option("--array-job", default=None, help="The array's job id: each task's state is checked with scontrol.")
@click.option("--qc/--no-qc", default=True, show_default=True, help="Run the QC report of every output folder.")
def slurm_summary_command(run_dir, shards, array_job, qc):
    """One summary of a stage 4 array (bin/slurm_masks.sh): per shard, failed images, exit 1 on any failure."""
    tasks = task_states(job_records(array_job)) if array_job else None
    summary = summarise(run_dir, shards, tasks)
    if qc:
        summary["qc"] = run_qc_folders(summary["folders"])
        if not all(q["ok"] for q in summary["qc"]):
            summary["exit_status"] = 1
    text = summary_text(summary, array_job)
    write_json_atomic(summary, Path(run_dir) / "summary.json")
    write_text_atomic(text, Path(run_dir) / "summary.txt")
    click.echo(text, nl=False)
    sys.exit(summary["exit_status"])


@click.command("slurm-check-array")
@click.argument("job_id")
@click.option("--expect", required=True, help='The array task ids that must have completed, e.g. "0 1" or "0-4".')
@click.option("--name", "name", default="task {}", show_default=True, help="How to call task {} in messages.")
@click.option("--log", "log", default=None, help="Log file pattern of task {} (named in messages).")
def slurm_check_array_command(job_id, expect, name, log):
    """Exit 1, naming each one, when a task of array JOB_ID did not complete (e.g. a failed training fold)."""
    wanted = parse_index_list(expect.replace(" ", ","))
    tasks = task_states(job_records(job_id))
    bad = []
    for i in wanted:
        state = describe_task(tasks.get(i))
        if state != "COMPLETED":
            bad.append(f"{name.format(i)} {state}" + (f"; log: {log.format(i)}" if log else ""))
    for line in bad:
        click.echo(f"slurm-check-array: {line}", err=True)
    if bad:
        click.echo(f"slurm-check-array: array job {job_id}: {len(bad)} of {len(wanted)} did not complete; stopping",
                   err=True)
        sys.exit(1)
    click.echo(f"slurm-check-array: array job {job_id}: all {len(wanted)} completed")
