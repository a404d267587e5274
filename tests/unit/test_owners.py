"""The ownership state machine (shim.owners), case by case: the transitions of
design.md's diagram, each with the fact that allows it."""

from __future__ import annotations

from collections.abc import Callable

from shim.owners import Decision, OwnerTable, Refuse, Send, StartMove, Wait

BOTH = ["mma", "mms"]


def alive(*names: str) -> Callable[[str], bool]:
    return lambda b: b in names


def decide(t: OwnerTable, model: str, desired: str, *, loads: bool = True,
           servable: list[str] = BOTH, up: tuple[str, ...] = ("mma", "mms")) -> Decision:
    return t.decide(model, loads=loads, desired=desired, servable=servable,
                    alive=alive(*up), now=0.0)


def test_unowned_is_claimed_where_the_weights_want_it_or_by_a_live_backend() -> None:
    t = OwnerTable()
    assert decide(t, "phi-2", "mms") == Send("mms", claim=True)
    assert t.owners == {"phi-2": "mms"}
    assert decide(t, "tinyllama", "mms", up=("mma",)) == Send("mma", claim=True)
    assert decide(t, "piper-tts", "mma", loads=False) == Send("mma")  # unload claims nothing
    assert "piper-tts" not in t.owners


def test_a_silent_owner_keeps_its_model() -> None:
    t = OwnerTable(owners={"phi-2": "mma"})
    refused = decide(t, "phi-2", "mms", up=("mms",))
    assert isinstance(refused, Refuse) and refused.owner == "mma"
    assert decide(t, "phi-2", "mma", up=("mms",)) == Send("mma")  # where the weights want it
    assert t.owners == {"phi-2": "mma"} and not t.moves
    assert t.suspect(alive("mms")) == ["phi-2"]


def test_a_move_frees_the_model_only_on_the_unload_reply() -> None:
    t = OwnerTable(owners={"phi-2": "mma"})
    assert decide(t, "phi-2", "mms") == StartMove("phi-2", "mma", "mms")
    assert decide(t, "phi-2", "mms") == Wait("phi-2")  # one move per model
    assert t.unload_sending("phi-2") is not None
    t.unload_result("phi-2", confirmed=False)  # timeout / error: it stays
    assert t.owners == {"phi-2": "mma"} and not t.moves
    assert decide(t, "phi-2", "mms") == StartMove("phi-2", "mma", "mms")
    t.unload_sending("phi-2")
    t.unload_result("phi-2", confirmed=True)
    assert t.owners == {} and t.moves_done == 1
    assert decide(t, "phi-2", "mms") == Send("mms", claim=True)


def test_a_weight_change_back_cancels_a_move_before_its_unload_only() -> None:
    t = OwnerTable(owners={"phi-2": "mma", "tinyllama": "mma"})
    decide(t, "phi-2", "mms")
    decide(t, "tinyllama", "mms")
    t.unload_sending("tinyllama")
    assert t.cancel_stale_moves(lambda m: "mma") == ["phi-2"]
    assert list(t.moves) == ["tinyllama"]  # past its unload: it finishes first


def test_requests_that_only_the_other_dialect_serves_are_refused_not_loaded() -> None:
    t = OwnerTable(owners={"phi-2": "mma"})
    refused = decide(t, "phi-2", "mms", servable=["mms"])
    assert isinstance(refused, Refuse) and refused.owner == "mma"
    many = t.decide_many(["tinyllama", "phi-2"], loads=True, desired=lambda m: "mms",
                         servable=["mms"], alive=alive("mma", "mms"), now=0.0)
    assert isinstance(many, Refuse) and "tinyllama" not in t.owners  # claims nothing


def test_a_poll_frees_only_what_the_owner_itself_reports_gone() -> None:
    t = OwnerTable(owners={"phi-2": "mma", "tinyllama": "mma"})
    since = t.snapshot()
    t.sent("tinyllama", "mma")  # a load under way is not in the report yet
    t.observe("mma", [], since)
    assert t.owners == {"tinyllama": "mma"}
    since = t.snapshot()
    t.answered("tinyllama", "mma", loaded=True)  # a reply newer than the poll wins
    t.observe("mma", [], since)
    assert t.owners == {"tinyllama": "mma"}
    assert t.observe("mms", ["tinyllama"], t.snapshot()) == ["tinyllama"]  # a duplicate


def test_release_forgets_the_owner_only_if_it_is_the_one_named() -> None:
    t = OwnerTable(owners={"phi-2": "mma"})
    assert t.release("phi-2", "mms") is None and t.owners == {"phi-2": "mma"}
    assert t.release("phi-2", "mma") == "mma" and t.owners == {}
    assert t.release("phi-2") is None
