"""MPI over tomograms (mpi4py), and nothing else: a single process is a world of size 1.

MPI is used only when the process was started by an MPI launcher (``mpirun``, ``mpiexec``, ``srun``);
then every rank takes a share of the tomograms, balanced by particle count, and rank 0 gathers.
A rank that fails aborts the whole job at once (``MPI_Abort``), so a job never hangs on a dead rank.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import contextmanager

_FORWARDING_GRACE_SECONDS = 1.0
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def launched_by_mpi() -> bool:
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


class World:
    """The ranks of this job (size 1 without MPI)."""

    def __init__(self):
        self.comm = None
        self.rank, self.size = 0, 1
        if launched_by_mpi():
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def share(self, names: list[str], weights: list[float]) -> list[str]:
        """This rank's names: greedy balance of ``weights`` (largest first) over the ranks."""
        loads = [0.0] * self.size
        owner = {}
        for name, weight in sorted(zip(names, weights), key=lambda item: (-item[1], item[0])):
            rank = loads.index(min(loads))
            owner[name] = rank
            loads[rank] += max(weight, 1.0)
        return [name for name in names if owner[name] == self.rank]

    def abort(self, code: int = 1) -> None:
        if self.comm is not None and self.size > 1:
            # the launcher forwards this rank's stderr through a pipe; MPI_Abort kills the forwarding
            # process too, so give it a moment to pass on the message just printed
            time.sleep(_FORWARDING_GRACE_SECONDS)
            self.comm.Abort(code)
        sys.exit(code)

    @contextmanager
    def guard(self):
        """Abort every rank if this one fails (an input error on all ranks exits normally)."""
        from .errors import InputError

        try:
            yield
        except InputError as error:
            if self.size > 1:
                # raised on this rank only (e.g. a problem found in its share of the tomograms): the
                # other ranks would wait for it forever at the next barrier
                for problem in error.problems:
                    print(f"error: rank {self.rank}: {problem}", file=sys.stderr)
                sys.stderr.flush()
                self.abort(2)
            raise
        except BaseException as error:  # noqa: BLE001 - any failure must stop the whole job
            if self.size > 1 and not isinstance(error, SystemExit):
                print(f"error: rank {self.rank} failed: {type(error).__name__}: {error}", file=sys.stderr)
                if os.environ.get("TOMOCTFREFINE_DEBUG"):
                    traceback.print_exc()
                sys.stderr.flush()
                self.abort(1)
            raise
