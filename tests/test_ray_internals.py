"""The private Ray and MLflow APIs the suite leans on (train/ray_internals.py) are all still
there in the installed versions; an upgrade that moves one fails here, naming it."""

from __future__ import annotations

import importlib.metadata

from train import ray_internals


def test_every_private_api_the_suite_uses_is_still_there():
    missing = ray_internals.missing_private_apis()
    assert not missing, "private APIs moved; see train/ray_internals.py:\n" + "\n".join(missing)


def test_a_moved_private_api_is_named_with_the_version_it_was_checked_against(monkeypatch):
    moved = (("a test", "ray._private.state", "state.no_such_method", "Ray 2.60.0"),
             ("a test", "ray.no_such_module", "", "Ray 2.60.0"))  # fmt: skip
    monkeypatch.setattr(ray_internals, "PRIVATE_APIS", moved)
    missing = ray_internals.missing_private_apis()
    assert len(missing) == 2
    assert missing[0].startswith("a test: ray._private.state.state.no_such_method is gone")
    assert missing[0].endswith("checked against Ray 2.60.0")
    assert missing[1].startswith("a test: ray.no_such_module is gone")


def test_the_pinned_ray_is_the_version_the_private_apis_were_checked_against():
    """requirements.txt pins Ray; a new pin asks that somebody check each private API against
    it (the test above says only whether they import) and update the table and the constant."""
    installed = importlib.metadata.version("ray")
    assert installed == ray_internals.RAY_CHECKED, (
        f"ray {installed} is installed; train/ray_internals.py was checked against {ray_internals.RAY_CHECKED}"
    )
