"""The output folder of a refinement: its run state, its step artefacts and the rules that keep it honest.

A :class:`Workspace` is what every step needs: the options, the inputs (absolute paths), the output folder,
and where each step keeps its per-tomogram results (``temp/<step>/``). It also holds the three guarantees
of the folder:

* **Exclusive.** :meth:`Workspace.lock` takes a POSIX lock on ``--o``: a second run is refused while the first
  lives; the kernel releases the lock when its process dies, so a dead run's folder is taken over.
* **Honest resume.** Each step's results are stamped with a key: the hash of the inputs' contents and of every
  option that step or an earlier one depends on (:data:`STEP_FIELDS`). A resumed run keeps a step's results
  only under the same key and redoes that step and the ones after it otherwise, saying why.
* **Atomic.** Every artefact is written under a temporary name and renamed, so a killed run (SIGTERM, a full
  disk) leaves only complete files behind and resumes from them.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, Problem
from ..io.atomic import save_npz, write_atomically
from ..options import RefineOptions, fields as option_fields, flag_of
from .plan import STEPS

RUN_FILE = "run.json"
LOCK_FILE = ".tomoctfrefine.lock"
KEY_FILE = "KEY"

#: The options each step's results depend on (besides the inputs and the earlier steps' options).
STEP_FIELDS: dict[str, tuple[str, ...]] = {
    "prepare": ("box_size_px", "freq_cutoff_angstrom", "fsc_threshold_width_px", "use_snr_weight", "per_frame_noise",
                "check_hand", "min_frame", "max_frame", "cutoff_fraction"),
    "refine_defocus": ("do_defocus", "defocus_scan_min_angstrom", "defocus_scan_max_angstrom", "defocus_scan_steps",
                       "regularise_defocus", "regularisation_lambda", "regularise_astigmatism_only", "reset_to_common",
                       "kmin_angstrom", "adopt_hand"),
    "refine_aberrations": ("do_even_aberrations", "even_order", "do_odd_aberrations", "odd_order"),
    "refine_scale": ("do_scale", "scale_mode", "model_neighbours"),
    "write_outputs": (),
    "assess_refinement": (),
}
#: The folder under ``temp/`` of each step that keeps per-tomogram results.
STEP_FOLDERS = {"prepare": "statistics", "refine_defocus": "defocus", "refine_aberrations": "aberrations",
                "refine_scale": "scale"}
#: Files larger than this are fingerprinted by their size and 64 sampled blocks, not read whole.
WHOLE_HASH_MAX_BYTES = 64 * 1024 * 1024
#: Output folder (real path) -> the open lock file of this process.
_HELD_LOCKS: dict = {}


@dataclass
class Workspace:
    """A refinement's output folder and state (``temp/run.json``).

    Attributes
    ----------
    out_dir : Path
    options : RefineOptions
    inputs : dict
        ``OptimisationSet`` field -> absolute path (or None), and ``extra`` (its other keys).
    command_line : str
    input_hash : str
        Fingerprint of every input file's contents (:func:`input_fingerprint`).
    pipeline_control : str or None
        RELION's job folder (``--pipeline_control``), where an abort request appears.
    """

    out_dir: Path
    options: RefineOptions
    inputs: dict
    command_line: str = ""
    input_hash: str = ""
    pipeline_control: str | None = None
    taken_over: str = ""

    @property
    def temp(self) -> Path:
        return self.out_dir / "temp"

    def step_dir(self, step: str) -> Path:
        return self.temp / STEP_FOLDERS[step]

    def artefact(self, step: str, name: str, suffix: str = ".npz") -> Path:
        """``temp/<step>/<name><suffix>``, refusing a name that would leave that folder."""
        folder = self.step_dir(step)
        path = folder / f"{name}{suffix}"
        if path.parent != folder or name in ("", ".", ".."):
            raise InputError(Problem(str(self.out_dir), f"the name {name!r} cannot be used as a file name",
                                     "rename the tomogram (rlnTomoName) without '/' or '..'"))
        return path

    def optimisation_set(self):
        from ..io.optimisation_set import OptimisationSet

        paths = {k: v for k, v in self.inputs.items() if k.endswith("_path")}
        return OptimisationSet(**paths, extra=dict(self.inputs.get("extra", {})))

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        state = {"options": asdict(self.options), "inputs": self.inputs, "command_line": self.command_line,
                 "input_hash": self.input_hash, "pipeline_control": self.pipeline_control,
                 "step_keys": {step: self.step_key(step) for step in STEPS}}
        write_json(self.temp / RUN_FILE, state)

    @classmethod
    def load(cls, out_dir) -> "Workspace":
        out_dir = Path(out_dir)
        path = out_dir / "temp" / RUN_FILE
        if not path.exists():
            raise InputError(Problem(str(out_dir), "no prepared refinement in this folder",
                                     "run the prepare step (tomoctfrefine refine) first"))
        state = json.loads(path.read_text())
        known = {f.name for f in option_fields()}
        options = RefineOptions(**{k: v for k, v in state["options"].items() if k in known})
        return cls(out_dir, options, state["inputs"], state.get("command_line", ""), state.get("input_hash", ""),
                   state.get("pipeline_control"))

    def step_key(self, step: str) -> str:
        """The key that stamps ``step``'s results: the inputs and every option up to and including ``step``."""
        names = [name for s in STEPS[:STEPS.index(step) + 1] for name in STEP_FIELDS[s]]
        return hashlib.sha1(f"{self.input_hash}:{self.options.fingerprint(names)}".encode()).hexdigest()[:16]

    def open_step(self, step: str) -> Path:
        """The step's folder, emptied if it holds results made under another key; stamps it with this run's."""
        folder = self.step_dir(step)
        key_file = folder / KEY_FILE
        key = self.step_key(step)
        if key_file.exists() and key_file.read_text().strip() != key:
            clear_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            write_text(key_file, key + "\n")
        return folder

    def stale_steps(self, previous: dict) -> list[str]:
        """Steps whose results in the folder were made under other inputs or options than this run's."""
        keys = previous.get("step_keys", {})
        return [step for step in STEP_FOLDERS if keys.get(step) not in (None, self.step_key(step))]

    # ------------------------------------------------------------------ exclusive access
    def lock(self) -> None:
        """Take the folder's lock for the life of this process (refused while another run holds it).

        POSIX locks belong to the process and go when any of its handles on the file is closed, so the handle is
        kept once per process and folder (:data:`_HELD_LOCKS`): a second :meth:`lock` in the same process is a
        no-op."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.out_dir)
        if key in _HELD_LOCKS:
            return
        path = self.out_dir / LOCK_FILE
        handle = open(path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise InputError(Problem(str(self.out_dir), f"another tomoctfrefine run is writing to this folder ({holder})",
                                     "wait for it to finish, or give another --o")) from None
        handle.seek(0)
        self.taken_over = handle.read().strip()
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        _HELD_LOCKS[key] = handle

    def unlock(self) -> None:
        """Release the lock (an empty lock file says the last run ended normally)."""
        handle = _HELD_LOCKS.pop(os.path.realpath(self.out_dir), None)
        if handle is not None:
            handle.truncate(0)
            handle.close()

    def abort_requested(self) -> bool:
        """True when RELION's pipeliner asked this job to stop (``RELION_JOB_ABORT_NOW`` in its folder)."""
        return bool(self.pipeline_control) and (Path(self.pipeline_control) / "RELION_JOB_ABORT_NOW").exists()

    def check_abort(self) -> None:
        """Stop here (between tomograms) if RELION's pipeliner asked for it."""
        if self.abort_requested():
            raise JobAborted(self.pipeline_control)


class JobAborted(Exception):
    """RELION's pipeliner asked the job to stop (``RELION_JOB_ABORT_NOW``)."""


# ------------------------------------------------------------------------------ inputs


def input_fingerprint(paths) -> str:
    """Hash of the contents of ``paths`` (files up to :data:`WHOLE_HASH_MAX_BYTES` whole, larger ones by their
    size and 64 blocks of 64 KiB spread over them), in the given order; a missing file hashes as missing."""
    digest = hashlib.sha1()
    for path in paths:
        path = Path(path)
        digest.update(str(path).encode())
        try:
            size = path.stat().st_size
        except OSError:
            digest.update(b"missing")
            continue
        digest.update(str(size).encode())
        with open(path, "rb") as handle:
            if size <= WHOLE_HASH_MAX_BYTES:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            else:
                for offset in np.linspace(0, size - 65536, 64).astype(np.int64):
                    handle.seek(int(offset))
                    digest.update(handle.read(65536))
    return digest.hexdigest()[:16]


def describe_changes(previous: dict, options: RefineOptions, inputs: dict, input_hash: str) -> list[str]:
    """What differs between an earlier run's state and this one (flags and files, in words)."""
    changes = []
    old = previous.get("options", {})
    for f in option_fields():
        if f.metadata["affects_results"] and f.name in old and old[f.name] != getattr(options, f.name):
            changes.append(f"{flag_of(f.name)} {old[f.name]} -> {getattr(options, f.name)}")
    if previous.get("inputs") not in (None, inputs):
        changes.append("other input files")
    elif previous.get("input_hash") not in (None, "", input_hash):
        changes.append("the input files' contents")
    return changes


# ------------------------------------------------------------------------------ atomic files


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data) -> None:
    """JSON, atomically; NaN is refused (other programs read it)."""
    from ..report import write_summary

    write_summary(data, path)


def save_arrays(path: Path, **arrays) -> None:
    """Save arrays atomically (``.npz``); None values are skipped."""
    save_npz(path, **arrays)


def finished(path: Path) -> bool:
    """True when ``path`` is a complete ``.npz``. A damaged one (truncated by a copy, or by a crash on a file
    system without atomic rename) is removed, so that a resumed run redoes it instead of failing."""
    if not path.exists():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is None:
                return True
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        pass
    path.unlink(missing_ok=True)
    return False


def load_arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def clear_folder(folder: Path) -> None:
    """Remove the files of a step folder (only files this program writes there: it is under ``temp/``)."""
    if not folder.exists():
        return
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()


# ------------------------------------------------------------------------------ log


def log(workspace_or_dir, message: str) -> None:
    """Print a progress line and append it to ``out_dir/run.log``."""
    out_dir = workspace_or_dir.out_dir if isinstance(workspace_or_dir, Workspace) else Path(workspace_or_dir)
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(("\r\x1b[K" if sys.stdout.isatty() else "") + line, flush=True)  # over a progress bar
    with open(out_dir / "run.log", "a") as handle:
        handle.write(line + "\n")
