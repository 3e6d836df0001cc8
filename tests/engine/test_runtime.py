"""engine/runtime.py's handling of what Ray streams from its workers' logs to a cellray command's terminal."""

from __future__ import annotations

from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from engine.runtime import quiet_benign_ray_lines

# as Ray 2.60's TrainController logs it, on every Ray Train run
BENIGN = (
    "[2026-12-03 17:20:34,573 E 31801 31831] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'acfb60bc33dd9e6dd06034da01000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail."
)

# the same line for any other actor: a user's own, which cellray does not hide
OTHER = BENIGN.replace("'PreemptionWatcher'", "'MyActor'")


def test_the_preemption_watcher_line_is_dropped_and_every_other_line_printed():
    printed: list[dict] = []
    before = list(dispatcher.handlers)  # the session's Ray may have its own printer: put back as it was
    dispatcher.handlers = [("ray_print_logs", printed.append)]
    try:
        quiet_benign_ray_lines()
        quiet_benign_ray_lines()  # idempotent: one wrapper, not two
        dispatcher.emit({"pid": 1, "is_err": True, "lines": [BENIGN, "ValueError: a user's own error"]})
        dispatcher.emit({"pid": 1, "is_err": True, "lines": [BENIGN]})
        dispatcher.emit({"pid": 3, "is_err": True, "lines": [OTHER]})
        dispatcher.emit({"pid": 2, "is_err": False, "lines": ["step 1", "Actor with class name: 'MyActor' failed"]})
        assert len(dispatcher.handlers) == 1
    finally:
        dispatcher.handlers = before
    assert [d["lines"] for d in printed] == [
        ["ValueError: a user's own error"],
        [OTHER],
        ["step 1", "Actor with class name: 'MyActor' failed"],
    ]
