"""A seeded fuzzer of every script's boundaries (issue 21): malformed checkpoints, data folders, Karpathy JSON and CSV
files and flags (fuzz_cases.py), generated from valid ones by one mutation each, run through the scripts' main() and
a sample of them through real subprocesses. Each must end in exit 2 with exactly one line on stderr that names the
offending file or flag, no traceback, and nothing written. Every kind of mutation runs at least once; the seed picks
the field, the value and the place, so another seed (fuzz_cases.SEED) probes other cases.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

import caption
import create_input_files
import datasets
import eval as evaluate
import sources
import train
from checkpoints import save_checkpoint
from fuzz_cases import SEED, Case, Workspace, checkpoint_cases, data_cases, flag_cases, source_cases
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]
MAINS: dict[str, Callable] = {"train": train.main, "eval": evaluate.main, "caption": caption.main,
                              "create_input_files": create_input_files.main}


def outcome(ws: Workspace, case: Case, capsys: pytest.CaptureFixture) -> str | None:
    """None when the case was refused as it must be, else what went wrong."""
    before = ws.snapshot()
    capsys.readouterr()
    try:
        run_cli(MAINS[case.script], case.argv)
        code = 0
    except SystemExit as e:
        code = e.code
    except BaseException as e:  # noqa: BLE001 - a traceback is exactly the failure this test looks for
        return f"raised {type(e).__name__}: {str(e)[:200]}"
    return judge(code, capsys.readouterr().err, case, ws, before)


def judge(code: int, stderr: str, case: Case, ws: Workspace, before: dict) -> str | None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code != 2 or len(lines) != 1 or "Traceback" in stderr:
        return f"exit {code}, {len(lines)} stderr lines: {stderr[-400:]!r}"
    if not lines[0].startswith("error: ") or case.mention not in lines[0]:
        return f"the line does not name {case.mention}: {lines[0]}"
    after = ws.snapshot()
    if after != before:
        return f"changed files: {sorted(set(after.items()) ^ set(before.items()))[:4]}"
    return None


# ------------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def workspace(trained_checkpoint, shapes_data, tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("fuzz"), trained_checkpoint, shapes_data)


@pytest.fixture(scope="module")
def cases(workspace: Workspace) -> list[Case]:
    generated = [*checkpoint_cases(workspace), *data_cases(workspace), *source_cases(workspace),
                 *flag_cases(workspace)]
    names = [c.name for c in generated]
    assert len(generated) > 150 and len(set(names)) > 0.8 * len(names)
    return generated


def test_the_valid_inputs_pass(workspace: Workspace, capsys) -> None:
    """The fuzzer's starting points are accepted: a refusal below is the mutation's doing."""
    model = workspace.root / "model.pt"
    save_checkpoint(model, workspace.model_only)
    evaluate.main(["--checkpoint", str(model), "--data-folder", str(workspace.test_data), "--data-name",
                   workspace.name, "--beam-sizes", "1", "--metrics", "bleu", "--max-len", "8", "--out",
                   str(workspace.root / "valid_eval")])
    assert json.loads((workspace.root / "valid_eval" / "scores.json").read_text())["beam1"]["bleu4"] >= 0
    datasets.ImageCaptionsDataset(workspace.tiny_data, workspace.tiny_name, "train")
    assert len(sources.read_karpathy(workspace.root / "tiny_raw" / "dataset_shapes.json", workspace.images)) == 16
    shutil.rmtree(workspace.root / "valid_eval")


def test_every_malformed_input_is_refused_in_one_line_and_writes_nothing(workspace, cases, capsys) -> None:
    failures = [f"{case.name}: {problem}" for case in cases if (problem := outcome(workspace, case, capsys))]
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)


def test_a_sample_through_real_subprocesses(workspace, cases) -> None:
    """Warnings, import-time errors and the real exit path show only here."""
    sample = random.Random(SEED).sample(cases, 4)
    script_path = {"train": "train.py", "eval": "eval.py", "caption": "caption.py",
                   "create_input_files": "create_input_files.py"}
    before = workspace.snapshot()

    def run(case: Case) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script_path[case.script], *case.argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, sample))
    failures = [f"{case.name}: {problem}" for case, result in zip(sample, results)
                if (problem := judge(result.returncode, result.stderr, case, workspace, before))]
    assert not failures, "\n".join(failures)
