"""Shared fixtures: tiny random models (no downloads) and a private model cache per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # Tests never touch the user's cache, except the integration tests that opt in to
    # the shared converted default model (see integration_cache).
    if "UNLEARN_TEST_CACHE" not in os.environ:
        monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path_factory.getbasetemp() / "unlearn-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return tiny_models.build_llama(tmp_path_factory.mktemp("tiny-llama"), chat_template=True)


@pytest.fixture(scope="session")
def llama_plain_dir(tmp_path_factory):
    return tiny_models.build_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=False)


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory):
    return tiny_models.build_opt(tmp_path_factory.mktemp("tiny-opt"))
