"""The repair phase: once the forget set is forgotten, steps of the keep terms alone while nothing leaks.

Why: the step at which the stop rule first finds nothing leaking is often the most damaged
one. Adam's first steps move every adapter weight by the full learning rate, the KL terms
are zero until the model has moved, and the ascent that lowers "Paris" after "France"
lowers every capital with it: on the dev scenario `capitals` the default kept 0-1 of 10
neighbouring facts at its stop (docs/quality.md, "The stop rule stops at the worst
moment"). The KL terms (normal rows, --retain rows, the automatic probes) pull the model
back towards the original wherever it drifted, but while the ascent keeps pushing they
only partly win. So after the stop rule first fires (step s), the run goes on for up to
`budget` more steps (`--repair-steps`; auto: s, at most AUTO_CAP) in which a step trains
the keep terms alone while the last check found nothing leaking, and the whole loss
(ascent included) after a check that found a leak. Every step is checked as before, and
the run ends at the first check from step s + budget on that finds nothing leaking (or at
--max-steps), so the saved model passes the same stop rule as without the phase.

The phase is a loop over two kinds of step, decided by the last check. Its state is a few
integers, saved in checkpoints (`state`, `from_state`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# auto's bound: as many steps again as forgetting took, but at most this many. Forgetting takes
# 3-9 steps on `capitals` and the README run, 14-35 on the other dev scenarios, where doubling the
# steps would double the run (declared before the runs that chose the setting: docs/quality.md,
# "Repair steps").
AUTO_CAP = 10


def budget(setting: int | None, first_forgotten: int) -> int:
    """The repair steps a run gets when the stop rule first fires after FIRST_FORGOTTEN steps: SETTING
    (--repair-steps N), or for auto (None) as many as forgetting took, at most AUTO_CAP; 0 is off."""
    if setting is None:
        return min(first_forgotten, AUTO_CAP)
    return setting


@dataclass
class Repair:
    """Where a run is in its repair phase. `keep_terms_only`: the last check found nothing leaking, so the next
    step (unless the phase is `finished`) trains the keep terms alone."""

    first_forgotten: int  # the step after which the stop rule first found nothing leaking
    end: int  # the first step whose check may end the run
    keep_terms_only: bool = True  # the check that started the phase found nothing leaking
    finished: bool = False

    @classmethod
    def start(cls, step: int, steps: int) -> "Repair":
        return cls(first_forgotten=step, end=step + steps)

    def checked(self, step: int, done: bool, clean: bool | None = None) -> None:
        """The check after STEP: CLEAN, its forget prompts leak at most --stop-leak (default: DONE), decides the
        next step's kind; DONE, the whole stop rule holds (--stop-probes too), may end the phase. Probes that are
        not yet kept are no leak: training the ascent again for them would push on what damaged them."""
        self.keep_terms_only = done if clean is None else clean
        self.finished = done and step >= self.end

    def describe(self, step: int, stop_leak: float = 0.0) -> str:
        """What the next step does, for the log line of the check after STEP (STOP_LEAK: the leak the stop rule
        allows, which the keep-terms steps then allow too)."""
        if self.finished:
            return "repair over: stop"
        if stop_leak:
            what = (f"the keep terms alone (leak at most --stop-leak {stop_leak:g})" if self.keep_terms_only
                    else f"the whole loss again (a leak past --stop-leak {stop_leak:g}, or the margin failed)")
        else:
            what = ("the keep terms alone (nothing leaks)" if self.keep_terms_only
                    else "the whole loss again (a leak, or the margin failed)")
        until = (f"repair until step {self.end}" if step < self.end
                 else "repair over, stopping at the first check where the stop rule holds")
        return f"next step trains {what}; {until}"

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> "Repair | None":
        return cls(**state) if state else None


def next_step_keeps_only(phase: Repair | None) -> bool:
    """Whether the next step trains the keep terms alone: inside a phase that is not over, after a clean check."""
    return bool(phase and phase.keep_terms_only and not phase.finished)
