"""Which physical cache slots changed between two snapshots of a stream (pure arithmetic).

The engine keeps a stream's cache in a fixed physical layout of
``num_sinks + window`` slots::

    slot:   0 .. num_sinks-1 | num_sinks .. num_sinks+window-1
            sink tokens      | ring buffer of the most recent tokens

Token number ``i`` (counting every token written since the stream started or was
reset) lands in slot ``i`` while ``i < num_sinks`` and in slot
``num_sinks + (i - num_sinks) % window`` afterwards. A key is rotated once when it is
written, so a slot's content does not change until the ring overwrites it, except that a
rebase (see ``worker.engine.layout``) rewrites every window slot. Between two snapshots
of the same ``cache_epoch``, only the slots of the tokens written in between differ; a
new epoch needs a full base (``snapshots.plan_delta``).
"""

from __future__ import annotations


def slot_of_token(token_index: int, num_sinks: int, window: int) -> int:
    """Return the physical slot that holds token number ``token_index``."""
    if token_index < num_sinks:
        return token_index
    return num_sinks + (token_index - num_sinks) % window


def changed_slots(prev_written: int, new_written: int, num_sinks: int, window: int) -> list[int] | None:
    """Return the sorted slots written by tokens ``prev_written .. new_written-1``.

    Returns ``None`` when ``new_written < prev_written``, because the stream was
    reset and its cache no longer extends the previous snapshot, so a full base is
    needed. An empty list means nothing changed.
    """
    if window < 1 or num_sinks < 0 or prev_written < 0:
        raise ValueError(
            f"invalid layout: num_sinks={num_sinks}, window={window}, prev_written={prev_written}; "
            "num_sinks must be >= 0, window >= 1 and token counts >= 0"
        )
    if new_written < prev_written:
        return None
    slots: set[int] = set()

    # Sink slots are written once, by the first num_sinks tokens.
    slots.update(range(prev_written, min(new_written, num_sinks)))

    # Ring slots: at most one full turn of the ring can differ.
    first_ring_token = max(prev_written, num_sinks)
    num_ring_tokens = new_written - first_ring_token
    if num_ring_tokens >= window:
        slots.update(range(num_sinks, num_sinks + window))
    else:
        for token_index in range(first_ring_token, new_written):
            slots.add(slot_of_token(token_index, num_sinks, window))
    return sorted(slots)


def filled_slots(written: int, num_sinks: int, window: int) -> int:
    """Return how many physical slots hold a token after ``written`` tokens."""
    return min(written, num_sinks + window)
