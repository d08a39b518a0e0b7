"""Faults lose nothing: a full disk, SIGINT / SIGTERM, a kill during ``--overwrite``, a lying safetensors header
and two merges into one folder each end with the old output intact (or the complete new one), no temporary
folder, no lock file, and one clear ``error:`` line."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hf_atm.merging.engine as engine
import hf_atm.merging.io as io_module
import hf_atm.merging.output as output
from hf_atm.cli import main
from hf_atm.errors import CheckpointError, OutputBusyError
from hf_atm.merging.io import CheckpointReader
from tests.helpers import load_checkpoint, save_raw_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: flock, renameat2, tmpfs")
REPO = Path(__file__).resolve().parents[1]


def _ckpt(folder: Path, seed: int, n: int = 3, shape: tuple[int, ...] = (512, 512)) -> Path:
    g = torch.Generator().manual_seed(seed)
    return save_raw_checkpoint(folder, {f"l{i}.weight": torch.randn(shape, generator=g) for i in range(n)})


def _merge(base: Path, models: list[Path], out: Path, *extra: str) -> int:
    return main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
                 "--output", str(out), "--no-progress", *extra])


def _traces(parent: Path, name: str = "out") -> list[str]:
    """Temporary folders, old folders and lock files of output `name` left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model*.safetensors"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base and two models of 3 x 1 MB float32 tensors, and the reference merge of them (on the big disk)."""
    root = tmp_path_factory.mktemp("faults")
    base, m0, m1 = _ckpt(root / "base", 0), _ckpt(root / "m0", 1), _ckpt(root / "m1", 2)
    assert _merge(base, [m0, m1], root / "ref") == 0
    return base, [m0, m1], root / "ref"


# ---------------------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB filesystem: a real tmpfs where this machine lets us mount one (root), else a plain folder
    (``mounted`` False: the tests then fake the free space / inject ENOSPC)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True
    ).returncode == 0
    try:
        yield mnt, mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)


def test_output_larger_than_the_free_space_is_refused_up_front(ckpts, small_fs, capsys, monkeypatch):
    (base, models, ref), (mnt, mounted) = ckpts, small_fs
    if not mounted:
        monkeypatch.setattr(output, "free_bytes", lambda path: 2 * 10**6)
    out = mnt / "out"
    assert _merge(base, models, out) == 2
    line = _one_error_line(capsys.readouterr().err)
    needed = _shard_bytes(ref)  # the 3 MB the planned shard takes
    assert "not enough free space" in line and f"{needed:,} bytes" in line and str(out) in line
    free = int(re.search(r"only .*?\(([\d,]+) bytes\) are free", line).group(1).replace(",", ""))
    assert 0 < free <= 2 * 2**20 < needed
    assert not out.exists() and _traces(mnt) == []
    # a merge that fits goes through on the same filesystem
    small = [_ckpt(mnt.parent / f"s{i}", i, shape=(64, 64)) for i in range(2)]
    assert _merge(small[0], small[1:], out) == 0 and (out / "model.safetensors").is_file()
    assert _traces(mnt) == []


def test_disk_filling_during_the_write(ckpts, small_fs, capsys, monkeypatch):
    """The free-space check passes, then the device fills (another process): ENOSPC from the real tmpfs
    (or injected at the writer's file), reported with the space needed, nothing left behind."""
    (base, models, ref), (mnt, mounted) = ckpts, small_fs
    monkeypatch.setattr(engine, "check_free_space", lambda *a: None)
    if not mounted:
        real_open = open

        class _Full:
            def __init__(self, fh):
                self.fh, self.left = fh, 2 * 2**20

            def write(self, data):
                n = memoryview(data).nbytes
                if n > self.left:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.left -= n
                return self.fh.write(data)

            def close(self):
                self.fh.close()

        def fake_open(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            return _Full(fh) if "w" in mode else fh  # the writer's shards

        monkeypatch.setattr(io_module, "open", fake_open, raising=False)
    free_before = output.free_bytes(mnt)
    assert free_before <= 2 * 2**20 or not mounted
    out = mnt / "out"
    assert _merge(base, models, out) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: no space left on the device while writing")
    assert f"{_shard_bytes(ref):,} bytes" in line and "are free now" in line
    assert not out.exists() and _traces(mnt) == []
    assert output.free_bytes(mnt) == free_before  # the partial shard is gone


# -------------------------------------------------------------------------------------------- signals
def test_sigint_and_sigterm_mid_merge_remove_the_temporary_folder(tmp_path):
    """Real ``python -m hf_atm merge`` processes, signalled once their temporary folder exists."""
    g = torch.Generator().manual_seed(0)
    shape = (256, 512)
    tensors = {f"l{i}.weight": torch.randn(shape, generator=g) for i in range(16)}
    folders = []
    for name in ("base", "m0", "m1"):
        noisy = {k: v + 0.01 * torch.randn(shape, generator=g) for k, v in tensors.items()}
        folders.append(save_raw_checkpoint(tmp_path / name, noisy))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def start(out: Path) -> subprocess.Popen:
        argv = [sys.executable, "-m", "hf_atm", "merge", "--base", str(folders[0]), "--models",
                *map(str, folders[1:]), "--method", "ties", "--output", str(out), "--no-progress"]
        # SIGINT back to its default (a background shell starts children with it ignored)
        return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    runs = {sig: (tmp_path / f"out_{sig.name}", None) for sig in (signal.SIGINT, signal.SIGTERM)}
    runs = {sig: (out, start(out)) for sig, (out, _) in runs.items()}
    pending = dict(runs)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for sig, (out, proc) in list(pending.items()):
            if list(tmp_path.glob(f".{out.name}.tmp-*")):
                proc.send_signal(sig)
                del pending[sig]
            elif proc.poll() is not None:
                pytest.fail(f"merge ended before it was signalled: {proc.communicate()}")
        time.sleep(0.005)
    assert not pending, "no temporary folder appeared"
    for sig, (out, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, (proc.returncode, stderr)
        assert _one_error_line(stderr) == f"error: hf-atm merge was interrupted ({sig.name})"
        assert not out.exists() and _traces(tmp_path, out.name) == []


# ------------------------------------------------------------------------------------------ overwrite
def _state(folder: Path) -> tuple[list[str], dict[str, torch.Tensor]] | None:
    """What a reader would find at `folder` now: its files and tensors (None: no folder)."""
    if not folder.is_dir():
        return None
    return sorted(p.name for p in folder.iterdir()), load_checkpoint(folder)


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("when", ["before", "after"])
def test_overwrite_swaps_atomically(ckpts, tmp_path, capsys, monkeypatch, when):
    """A kill right before or right after the exchange finds OUT_DIR complete (old or new), never a mix or
    nothing; the interrupted process then cleans up and the output is whichever was in place."""
    base, models, ref = ckpts
    out = tmp_path / "out"
    assert _merge(base, models[:1], out) == 0
    old = _state(out)
    seen = []
    real = output._exchange

    def exchange(a: Path, b: Path) -> bool:
        seen.append(_state(b))
        if when == "before":
            raise output.Interrupted(signal.SIGTERM)
        assert real(a, b) is True  # renameat2(RENAME_EXCHANGE) works here
        seen.append(_state(b))
        raise output.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(output, "_exchange", exchange)
    assert _merge(base, models, out, "--overwrite") == 143
    assert "interrupted (SIGTERM)" in _one_error_line(capsys.readouterr().err)
    new = _state(ref)
    assert _same(seen[0], old)
    if when == "after":
        assert _same(seen[1], new) and _same(_state(out), new)
    else:
        assert _same(_state(out), old)
    assert _traces(tmp_path) == []


def test_overwrite_without_renameat2_falls_back_to_two_renames(ckpts, tmp_path, monkeypatch):
    base, models, ref = ckpts
    out = tmp_path / "out"
    assert _merge(base, models[:1], out) == 0
    monkeypatch.setattr(output, "_renameat2", None)
    assert _merge(base, models, out, "--overwrite") == 0
    assert _same(_state(out), _state(ref)) and _traces(tmp_path) == []


# --------------------------------------------------------------------------------------- lying headers
def _st_file(path: Path, header: dict, data_len: int, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + b"\0" * data_len)
    return path


def _t(begin: int, end: int, shape=(4,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


BAD_HEADERS = {
    "shorter than its header says": ({"a": _t(0, 16), "b": _t(16, 32)}, 20, None, "run past the end"),
    "offsets beyond the file": ({"a": _t(0, 16), "b": _t(1000, 1016)}, 32, None, "run past the end"),
    "overlapping": ({"a": _t(0, 16), "b": _t(8, 24)}, 24, None, "overlap"),
    "a gap": ({"a": _t(0, 16), "b": _t(20, 36)}, 36, None, "belong to no tensor"),
    "not covering the data": ({"a": _t(0, 16)}, 24, None, "cover 16 of the 24"),
    "offsets vs dtype x shape": ({"a": _t(0, 8)}, 8, None, "takes 16"),
    "header length beyond the file": ({"a": _t(0, 16)}, 16, 10**6, "header length"),
    "not json": (None, 0, None, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_lying_safetensors_header_is_refused_before_anything_is_written(tmp_path, capsys, case):
    header, data_len, header_len, fragment = BAD_HEADERS[case]
    base = save_raw_checkpoint(tmp_path / "base", {"a": torch.zeros(4), "b": torch.zeros(4)})
    model = tmp_path / "model"
    save_raw_checkpoint(model, {"a": torch.zeros(4)})
    bad = model / "model.safetensors"
    if header is None:
        bad.write_bytes(struct.pack("<Q", 4) + b"{no}")
    else:
        _st_file(bad, header, data_len, header_len)
    with pytest.raises(CheckpointError, match=re.escape(fragment)) as info:
        CheckpointReader(model)
    assert str(bad) in str(info.value)
    out = tmp_path / "out"
    assert _merge(base, [model], out) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and fragment in line
    assert not out.exists() and _traces(tmp_path) == []


def test_hand_made_valid_file_is_accepted(tmp_path):
    """Padding, metadata, a zero-size tensor and tensors listed out of offset order are all fine."""
    header = {"__metadata__": {"format": "pt"}, "b": _t(16, 24, shape=(2,)), "e": _t(16, 16, shape=(0, 3)),
              "a": _t(0, 16)}
    raw = json.dumps(header).encode() + b"   "
    folder = tmp_path / "ok"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(24)))
    with CheckpointReader(folder) as r:
        assert r.names == ["a", "e", "b"] and r.get("b").shape == (2,) and r.info("e").shape == (0, 3)


# ------------------------------------------------------------------------------------------------ lock
def test_second_merge_into_a_folder_being_written_fails_at_once(ckpts, tmp_path, capsys):
    """Another process holds the output's lock: the merge is refused; once that process is killed (SIGKILL:
    no cleanup, the lock file stays), the stale lock file and temporary folder block nothing."""
    base, models, ref = ckpts
    out = tmp_path / "out"
    lock = output.lock_path(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        assert _merge(base, models, out) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "is being written by another merge" in line and str(out) in line
        assert time.monotonic() - t0 < 20 and not out.exists() and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / ".out.tmp-deadbeef").mkdir()  # what the killed merge would have left
    assert lock.exists()
    assert _merge(base, models, out) == 0
    assert _same(_state(out), _state(ref)) and _traces(tmp_path) == []


def test_staged_output_lock_within_one_process(tmp_path):
    # handlers as found (another test's library, e.g. Ray, may have installed its own): they must come back as is
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    out = tmp_path / "deep" / "er" / "out"
    with output.staged_output(out, overwrite=False) as tmp:
        (tmp / "x").write_text("1")
        with pytest.raises(OutputBusyError, match="being written"):
            with output.staged_output(out, overwrite=True):
                pass
        assert tmp.is_dir() and output.lock_path(out).exists()
    assert (out / "x").read_text() == "1" and _traces(out.parent) == []
    # an error leaves nothing, not even the parent folders it created
    with pytest.raises(RuntimeError):
        with output.staged_output(tmp_path / "new" / "out", overwrite=False) as tmp:
            (tmp / "x").write_text("1")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
