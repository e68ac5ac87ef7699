"""Helpers shared by the headless Scipion tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import os
import time


def run_status(project, protocol) -> str:
    """The status the run itself last wrote (its run.db), read directly."""
    from pyworkflow.protocol import getProtocolFromDb

    run = getProtocolFromDb(project.getPath(), protocol.getDbPath(), protocol.getObjId())
    try:
        return run.getStatus()
    finally:
        run.getProject().closeMapper()
        run.closeMappers()


def launch(project, protocol, timeout_s: float | None = None):
    """Run ``protocol`` to its end; with ``timeout_s``, stop it and fail if it takes longer (a hung
    job must fail the test, not hang CI). Raises AssertionError with the log's end if it failed.

    The run's own database is polled, not ``Project._updateProtocol``: that one compares file times
    and, when the run's last write falls in the tick of its previous read, takes the finished run for a
    dead one and marks it failed (seen under load).
    """
    from pyworkflow.protocol import ACTIVE_STATUS

    if timeout_s is None:
        project.launchProtocol(protocol, wait=True)
    else:
        project.launchProtocol(protocol, wait=False)
        deadline = time.time() + timeout_s
        while run_status(project, protocol) in ACTIVE_STATUS:
            if time.time() > deadline:
                project.stopProtocol(protocol)
                raise AssertionError(f"{protocol.getRunName()} still running after {timeout_s} s: stopped")
            time.sleep(0.5)
        protocol.lastUpdateTimeStamp.set(None)  # read the run's database whatever the file times say
        project._updateProtocol(protocol)
    if not protocol.isFinished():
        logs = "\n".join(protocol.getLogsLastLines(40)) if hasattr(protocol, "getLogsLastLines") else ""
        raise AssertionError(f"{protocol.getRunName()} ended {protocol.getStatus()}:\n{logs}")
    return protocol


def new_protocol(project, protocol_class, **inputs_and_params):
    """A protocol with its parameters set; pointer inputs are given as ``(protocol, output name)``."""
    pointers = {k: v for k, v in inputs_and_params.items() if isinstance(v, tuple)}
    values = {k: v for k, v in inputs_and_params.items() if not isinstance(v, tuple)}
    protocol = project.newProtocol(protocol_class, **values)
    for name, (source, output) in pointers.items():
        getattr(protocol, name).set(source)
        getattr(protocol, name).setExtended(output)
    return protocol


class Carrier:
    """A finished protocol whose outputs are sets built in the test process: the way to give a
    protocol inputs that no installed importer makes (tilt series aligned by IMOD's .xf, subtomograms),
    built as the plugin that makes them would (its conventions are cited where they are used).

    ``path`` is the carrier's working folder (create the sets there); :meth:`publish` registers them.
    """

    def __init__(self, project, label: str):
        from tomoctfrefine.protocols import ProtTomoImportRelionMetadata

        self.project = project
        self.protocol = project.newProtocol(ProtTomoImportRelionMetadata)
        self.protocol.setObjLabel(label)
        project.saveProtocol(self.protocol)
        self.path = self.protocol._getPath()
        os.makedirs(self.path, exist_ok=True)

    def publish(self, **sets):
        """Register ``sets`` as the carrier's outputs (name -> set) and mark it finished."""
        from pyworkflow.protocol import STATUS_FINISHED

        for output in sets.values():
            output.write()
        self.protocol._defineOutputs(**sets)
        self.protocol.setStatus(STATUS_FINISHED)
        self.project._storeProtocol(self.protocol)
        return self.protocol
