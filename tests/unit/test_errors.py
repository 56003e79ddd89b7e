"""Every exception class streamrec defines derives from contracts.errors.StreamrecError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import contracts
import services
from contracts.errors import StreamrecError
from contracts.events import EventError
from services.serving.recommender import BadRequest


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for package in (contracts, services):
        for module_info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(module_info.name)
            found.extend(
                value
                for value in vars(module).values()
                if inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            )
    return found


EXCEPTIONS = _exception_classes()


def test_the_walk_finds_the_project_exceptions() -> None:
    assert len(EXCEPTIONS) >= 12
    assert {EventError, BadRequest} <= set(EXCEPTIONS)


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
def test_every_exception_class_derives_from_streamrec_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, StreamrecError), f"{cls.__module__}.{cls.__qualname__}"


def test_builtin_bases_are_kept() -> None:
    with pytest.raises(ValueError):
        raise EventError("callers catching ValueError still catch it")
