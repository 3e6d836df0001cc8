"""The suite's xdist scheduling (tests/conftest.py): its groups name files that exist, and every file that uses the
multi-node drill shares its worker (a file outside the group would run the drill a second time)."""

from __future__ import annotations

from tests.conftest import COSTLIEST_GROUPS_FIRST, ROOT, SHARED_SESSION_FIXTURE_GROUPS, xdist_group_of


def test_groups_name_files_that_exist():
    for prefix in SHARED_SESSION_FIXTURE_GROUPS:
        assert (ROOT / prefix).exists(), prefix
    shared = set(SHARED_SESSION_FIXTURE_GROUPS.values())
    for group in COSTLIEST_GROUPS_FIRST:
        assert group in shared or (ROOT / group).is_file(), group


def test_every_user_of_the_drill_shares_its_worker():
    users = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "tests").rglob("test_*.py")
        if "multinode_drill" in p.read_text() and p.name != "test_suite_scheduling.py"
    ]
    assert len(users) >= 2, users
    assert {xdist_group_of(u) for u in users} == {"multinode_drill"}, users
    assert xdist_group_of("tests/engine/infer/test_embed.py") == xdist_group_of("tests/engine/infer/test_resume.py")
    assert xdist_group_of("tests/engine/store/test_store.py") == "tests/engine/store/test_store.py"
