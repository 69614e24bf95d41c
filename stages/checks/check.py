"""A check's verdict, as `rl3d doctor` prints it: what was checked, ok or not, what was found and,
for a problem, how to fix it in plain words. The policy checks (stages/doctor.py) and each reward
backend's own `doctor` hook (stages/rewards/) return these."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Check:
    what: str            # the thing checked, e.g. "policy tokenizer"
    ok: bool
    detail: str          # what was found
    fix: str = ""        # for a problem: what to do, in plain words

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.what}: {self.detail}"
        return f"PROBLEM  {self.what}: {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")

    def as_dict(self) -> dict:
        return asdict(self)


def passed(what: str, detail: str) -> Check:
    return Check(what, True, detail)


def problem(what: str, detail: str, fix: str = "") -> Check:
    return Check(what, False, detail, fix)


def one_line(e) -> str:
    """An exception (or any text) as one line."""
    return " ".join(str(e).split()) or type(e).__name__


def env_fix(unset: dict[str, list[str]], options: tuple[str, ...]) -> str:
    """The exports that would set the unset ${VAR}s the given options named ("" when none)."""
    names = [n for o in options for n in unset.get(o, [])]
    return " or ".join(f"export {n}=..." for n in dict.fromkeys(names))
