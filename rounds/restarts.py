"""Fresh Ray actors after a ClientApp process died: the round ends, then the simulation restarts from it.

Under Flower 1.42's simulation a `ClientAppActor` whose process dies (Ray's OOM killer, a segfault,
`fail-mode=exit`) is never replaced: `RayBackend.process_message` puts the dead actor back in the pool and the
actor has no `max_restarts`, so every later message handed to it fails at once. Flower answers each such
message with an error reply whose reason names Ray's exception,
`<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task. ...'>`
(code `ErrorCode.UNKNOWN`: the engine failed, not the ClientApp, whose own exceptions come with
`CLIENT_APP_RAISED_EXCEPTION`). Nothing in Flower's public surface restarts an actor, but a new simulation
starts a new pool. So the round in which a process died ends as usual (its dead replies are `failed`, the
others are aggregated, the checkpoint and the metrics row are written), and then the ServerApp ends the run
with `ClientProcessDied`, leaving `restart.json` in its run folder; the launcher (`server_app.launch`) sees it
and resumes that folder (`resume`), so fresh actors take the remaining rounds. `actor-restarts` bounds how
many times one run does so (0: the run goes on with the dead actor, as Flower leaves it).

A reply is believed to tell of a dead actor only when this process runs Ray, i.e. the ServerApp runs inside
Flower's simulation engine (`flwr-simulation`): deployed SuperNodes start one ClientApp process per message,
so nothing needs replacing there, and a node's reply cannot make a deployed run stop.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from flcore.files import write_json

RESTART_FILE = "restart.json"  # in the run folder of a run that ended so that the launcher restarts it
DEATH_ERRORS = ("ray.exceptions.ActorDiedError", "ray.exceptions.RayActorError")  # how Flower names them


class ClientProcessDied(RuntimeError):
    """The run ends after a round in which a ClientApp process died, so that fresh actors take the rest."""


def simulation_engine_here() -> bool:
    """True in Flower's simulation process, where Ray runs beside the ServerApp; never imports Ray itself."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def process_died(reply: Message) -> bool:
    """Is this an error reply Flower's simulation engine gives for a message whose actor process is dead?"""
    if not reply.has_error() or reply.error.code != ErrorCode.UNKNOWN:
        return False
    reason = reply.error.reason or ""
    return any(reason.startswith(f"<class '{name}'>") for name in DEATH_ERRORS)


def first_line(reason: str) -> str:
    return reason.strip().splitlines()[0] if reason.strip() else ""


@dataclass(frozen=True)
class Restart:
    """One restart: the round after which the run ended and the error that told of the dead process."""

    after_round: int
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"after-round": self.after_round, "reason": self.reason}


def read_history(run_dir: Path) -> list[Restart]:
    """The restarts that led up to and include the end of the run in `run_dir` (none: no `restart.json`)."""
    path = Path(run_dir) / RESTART_FILE
    if not path.is_file():
        return []
    return [Restart(int(r["after-round"]), str(r["reason"])) for r in json.loads(path.read_text())["restarts"]]


def resumed_folder(resume: str) -> Path | None:
    """The run folder that `resume` (a run folder or its checkpoint.pt) continues, or None for a new run."""
    if not resume:
        return None
    path = Path(resume).expanduser()
    return path if path.is_dir() else path.parent


@dataclass
class ActorRestarts:
    """Decides, after each round, whether the run ends so that fresh actors take the remaining rounds.

    `history` is what the resumed run folder's `restart.json` says happened before (empty for a new run), so
    the bound `allowed` holds over a whole chain of restarts, whoever resumes the run.
    """

    allowed: int
    num_rounds: int
    run_dir: Path
    history: list[Restart] = field(default_factory=list)
    in_simulation: bool = True

    @classmethod
    def of(cls, allowed: int, num_rounds: int, run_dir: Path, resume: str = "") -> ActorRestarts:
        folder = resumed_folder(resume)
        history = read_history(folder) if folder is not None else []
        return cls(allowed, num_rounds, Path(run_dir), history, simulation_engine_here())

    def due(self, server_round: int, deaths: Iterable[str]) -> str | None:
        """The first death's reason when the run should end after `server_round`; None to go on: no process
        died, the ServerApp is not in a simulation, the run has no round left, or its restarts are spent."""
        deaths = list(deaths)
        if not deaths or not self.in_simulation or server_round >= self.num_rounds:
            return None
        if len(self.history) >= self.allowed:
            log(
                WARNING,
                "round %s: a client process died, and actor-restarts=%s restarts are spent; the run goes on with "
                "the dead actor, whose later messages fail",
                server_round,
                self.allowed,
            )
            return None
        return first_line(deaths[0])

    def after_round(self, server_round: int, deaths: Iterable[str]) -> None:
        """Raise `ClientProcessDied` after writing `restart.json` when a process died this round and a restart
        is allowed; the round's checkpoint is already written."""
        reason = self.due(server_round, deaths)
        if reason is None:
            return
        history = [*self.history, Restart(server_round, reason)]
        write_json(self.run_dir / RESTART_FILE, {"restarts": [r.as_json() for r in history]})
        raise ClientProcessDied(
            f"a client process died in round {server_round} ({reason}); Flower's simulation does not replace its "
            f"actor, so the run ends here and restarts from round {server_round} with fresh actors "
            f"(restart {len(history)} of at most actor-restarts={self.allowed}: the launcher resumes "
            f"{self.run_dir}; without it, resume={self.run_dir})"
        )

    def summary(self) -> list[dict[str, Any]]:
        """For summary.json: every restart of this run, in order."""
        return [r.as_json() for r in self.history]
