"""push_folder against tests/hub_stub.py, a local STUB of the Hub's commit API (not the Hub): which files and
bytes arrive, README metadata, branches, pull requests, re-pushes, the Hub's error messages, and the token."""

from __future__ import annotations

import argparse
import hashlib
import logging
import secrets

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import save_file

from hf_atm.errors import CheckpointError, HubError
from hf_atm.hub.push import (
    PUSH_ARG_DESTS,
    add_push_arguments,
    push_folder,
    push_from_args,
    register_push_command,
)
from tests.hub_stub import HubStub

pytestmark = pytest.mark.network

METADATA = {"base_model": ["org/base"], "library_name": "transformers", "tags": ["merge", "hf_atm"],
            "license": "apache-2.0"}


def _token() -> str:
    return "hf_" + secrets.token_hex(16)


@pytest.fixture
def stub(monkeypatch):
    """A running stub; huggingface_hub taken out of the test session's offline mode, and HF_TOKEN unset."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStub() as s:
        yield s


@pytest.fixture
def folder(tmp_path):
    """A finished output folder: a model card with metadata, a config, ~1 MB of weights, a nested file."""
    out = tmp_path / "merged"
    out.mkdir()
    ModelCard.from_template(ModelCardData(**METADATA), model_description="A merge.").save(out / "README.md")
    (out / "config.json").write_text('{"model_type": "bert"}\n')
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(512, 512, generator=g), "b": torch.randn(512, generator=g)},
              out / "model.safetensors", metadata={"format": "pt"})
    (out / "heads").mkdir()
    (out / "heads" / "task_a.json").write_text('{"num_labels": 3}\n')
    return out


def _snapshot(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _digest(folder) -> str:
    h = hashlib.sha256()
    for name, data in _snapshot(folder).items():
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()


def test_push_uploads_every_file_with_its_bytes_and_readme_metadata(stub, folder):
    token = _token()
    url = push_folder(folder, "org/merged", token=token, endpoint=stub.url)
    assert stub.files("org/merged") == _snapshot(folder)
    meta = stub.readme_metadata("org/merged")
    assert {k: meta[k] for k in METADATA} == METADATA
    assert len(stub.commits) == 1 and stub.commits[0]["summary"] == "Upload merged with hf-atm"
    assert url == f"{stub.url}/org/merged/commit/{stub.repos['org/merged'].heads['main']}"
    assert "visibility" not in stub.created[0]  # public or private is left to the Hub's default
    assert (stub.created[0]["organization"], stub.created[0]["name"]) == ("org", "merged")
    assert stub.auth == {f"Bearer {token}"}


def test_private_repo_new_branch_and_commit_message(stub, folder):
    push_folder(folder, "org/merged", private=True, revision="experiments", commit_message="ties d=0.2",
                token=_token(), endpoint=stub.url)
    assert stub.created[0]["visibility"] == "private"
    assert ("POST", "api/models/org/merged/branch/experiments") in stub.requests
    assert stub.files("org/merged", "experiments") == _snapshot(folder)
    assert stub.files("org/merged", "main") == {}
    assert stub.commits[0]["revision"] == "experiments" and stub.commits[0]["summary"] == "ties d=0.2"
    # Pushing to the now existing branch again works (create_branch answers 409, which is fine).
    (folder / "config.json").write_text('{"model_type": "bert", "v": 2}\n')
    push_folder(folder, "org/merged", revision="experiments", token=_token(), endpoint=stub.url)
    assert stub.files("org/merged", "experiments")["config.json"] == (folder / "config.json").read_bytes()


def test_repush_sends_only_changed_files(stub, folder):
    push_folder(folder, "org/merged", token=_token(), endpoint=stub.url)
    push_folder(folder, "org/merged", token=_token(), endpoint=stub.url)
    assert len(stub.commits) == 1  # nothing changed: no second commit
    (folder / "heads" / "task_a.json").write_text('{"num_labels": 4}\n')
    push_folder(folder, "org/merged", token=_token(), endpoint=stub.url)
    assert len(stub.commits) == 2
    assert set(stub.commits[1]["files"]) == {"heads/task_a.json"}
    assert stub.files("org/merged") == _snapshot(folder)


def test_large_files_travel_by_git_lfs_without_xet(stub, folder, monkeypatch):
    """Without Xet (HF_HUB_DISABLE_XET, or hf_xet not installed) the client uploads large files with the Git LFS
    batch protocol: the weights arrive as an LFS object (sha256-checked by the stub), the rest inline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    stub.lfs_threshold = 100_000
    push_folder(folder, "org/merged", token=_token(), endpoint=stub.url)
    weights = (folder / "model.safetensors").read_bytes()
    assert stub.lfs_paths == {"model.safetensors"}
    assert stub.lfs_objects == {hashlib.sha256(weights).hexdigest(): weights}
    assert stub.files("org/merged") == _snapshot(folder)
    # A re-push with only a small file changed neither re-sends nor re-commits the weights.
    (folder / "config.json").write_text('{"model_type": "bert", "v": 2}\n')
    before = len([r for r in stub.requests if r[1].startswith("lfs-upload")])
    push_folder(folder, "org/merged", token=_token(), endpoint=stub.url)
    assert len([r for r in stub.requests if r[1].startswith("lfs-upload")]) == before
    assert set(stub.commits[-1]["files"]) == {"config.json"}


def test_create_pr_commits_to_a_pull_request(stub, folder):
    push_folder(folder, "org/merged", token=_token(), endpoint=stub.url)
    (folder / "config.json").write_text('{"model_type": "bert", "v": 3}\n')
    url = push_folder(folder, "org/merged", create_pr=True, token=_token(), endpoint=stub.url)
    assert url.endswith("/org/merged/discussions/1")
    assert stub.commits[-1]["revision"] == "refs/pr/1"
    assert stub.files("org/merged", "refs/pr/1") == _snapshot(folder)
    assert stub.files("org/merged")["config.json"] != (folder / "config.json").read_bytes()  # main untouched
    with pytest.raises(HubError, match="--create-pr"):
        push_folder(folder, "org/merged", create_pr=True, revision="dev", token=_token(), endpoint=stub.url)


@pytest.mark.parametrize(
    "endpoint, status, message, kwargs",
    [
        ("create", 403, "You don't have the rights to create a model under the namespace \"org\"", {}),
        ("validate-yaml", 400, "Invalid metadata: license must be a string", {}),
        ("branch", 500, "Internal Error - We're working hard to fix this as soon as possible!",
         {"revision": "dev"}),
        ("commit", 403, "Forbidden: you must be a member of org to push to org/merged", {}),
    ],
)
def test_failed_push_names_the_hub_message_and_keeps_the_folder(stub, folder, endpoint, status, message, kwargs):
    before = _digest(folder)
    stub.fail[endpoint] = (status, message)
    with pytest.raises(HubError) as info:
        push_folder(folder, "org/merged", token=_token(), endpoint=stub.url, **kwargs)
    text = str(info.value)
    assert message in text and "org/merged" in text and "hf-atm push" in text
    assert "\n" not in text
    assert _digest(folder) == before
    assert stub.commits == []
    # Re-running the push once the Hub accepts it uploads the same folder.
    del stub.fail[endpoint]
    push_folder(folder, "org/merged", token=_token(), endpoint=stub.url, **kwargs)
    assert stub.files("org/merged", kwargs.get("revision", "main")) == _snapshot(folder)


def test_token_never_reaches_output_logs_files_or_errors(stub, folder, capfd, caplog):
    from huggingface_hub.utils import logging as hf_logging

    token = _token()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_debug()
    caplog.set_level(logging.DEBUG)  # every logger, including the HTTP client's request traces
    try:
        push_folder(folder, "org/merged", token=token, endpoint=stub.url)
        stub.fail["commit"] = (401, "Invalid credentials in Authorization header")
        (folder / "config.json").write_text("{}\n")
        with pytest.raises(HubError) as info:
            push_folder(folder, "org/merged", token=token, endpoint=stub.url)
    finally:
        hf_logging.set_verbosity(previous)
    assert f"Bearer {token}" in stub.auth  # the token was used...
    out, err = capfd.readouterr()
    assert "Invalid credentials" in str(info.value)
    for where, text in {"stdout": out, "stderr": err, "logs": caplog.text, "error": str(info.value)}.items():
        assert token not in text, where  # ...and never shown
    assert all(token.encode() not in p.read_bytes() for p in folder.parent.rglob("*") if p.is_file())


def test_error_message_redacts_a_token_the_server_echoes(stub, folder):
    token = _token()
    stub.fail["create"] = (401, f"Invalid token {token} for org")
    with pytest.raises(HubError) as info:
        push_folder(folder, "org/merged", token=token, endpoint=stub.url)
    assert token not in str(info.value) and "Invalid token *** for org" in str(info.value)


def test_token_from_environment(stub, folder, monkeypatch):
    token = _token()
    monkeypatch.setenv("HF_TOKEN", token)
    push_folder(folder, "org/merged", endpoint=stub.url)
    assert stub.auth == {f"Bearer {token}"}


def test_bad_inputs_fail_before_any_request(stub, folder, tmp_path, monkeypatch):
    with pytest.raises(HubError, match="invalid Hub repo id"):
        push_folder(folder, "org/bad name", token=_token(), endpoint=stub.url)
    with pytest.raises(HubError, match="namespace/name"):
        push_folder(folder, "merged", token=_token(), endpoint=stub.url)
    with pytest.raises(CheckpointError, match="not a folder"):
        push_folder(tmp_path / "missing", "org/merged", token=_token(), endpoint=stub.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no files"):
        push_folder(tmp_path / "empty", "org/merged", token=_token(), endpoint=stub.url)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_folder(folder, "org/merged", token=_token(), endpoint=stub.url)
    assert stub.requests == []


def test_cli_helpers_push_after_a_run_and_push_subcommand(stub, folder, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", stub.url)  # what HF_ENDPOINT sets at import time
    monkeypatch.setenv("HF_TOKEN", _token())
    # A command parser that suppresses unset options (as `hf-atm merge` does).
    merge = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    merge.add_argument("--output")
    add_push_arguments(merge)
    args = merge.parse_args(["--output", str(folder)])
    assert push_from_args(args, folder) is None and stub.requests == []
    args = merge.parse_args(["--output", str(folder), "--revision", "dev"])
    with pytest.raises(HubError, match="--revision only apply with --push-to-hub"):
        push_from_args(args, folder)
    args = merge.parse_args(["--push-to-hub", "org/merged", "--private", "--revision", "dev",
                             "--commit-message", "from the CLI"])
    assert set(vars(args)) - {"output"} <= set(PUSH_ARG_DESTS)
    push_from_args(args, folder)
    assert stub.created[0]["visibility"] == "private" and stub.commits[0]["summary"] == "from the CLI"
    assert stub.files("org/merged", "dev") == _snapshot(folder)

    cli = argparse.ArgumentParser(prog="hf-atm")
    register_push_command(cli.add_subparsers(dest="command"))
    args = cli.parse_args(["push", str(folder), "--repo-id", "org/other", "--commit-message", "re-push"])
    assert args.func(args) == 0
    assert "pushed" in capsys.readouterr().out
    assert stub.files("org/other") == _snapshot(folder) and stub.commits[-1]["summary"] == "re-push"


def test_merge_command_pushes_its_output(stub, tmp_path, monkeypatch, capsys):
    """`hf-atm merge ... --push-to-hub REPO --revision BRANCH` uploads the finished merge folder."""
    from huggingface_hub import constants

    from hf_atm.cli import main
    from tests.helpers import make_bert_checkpoints

    monkeypatch.setattr(constants, "ENDPOINT", stub.url)
    monkeypatch.setenv("HF_TOKEN", _token())
    base, models = make_bert_checkpoints(tmp_path / "ckpt", 2, hidden=16, layers=1)
    out = tmp_path / "merged"
    code = main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
                 "--output", str(out), "--no-progress", "--push-to-hub", "org/merged", "--revision", "v1"])
    assert code == 0, capsys.readouterr().err
    assert stub.files("org/merged", "v1") == _snapshot(out)
    assert "merge" in stub.readme_metadata("org/merged", "v1")["tags"]
    stub.fail["commit"] = (403, "Forbidden: read-only token")
    out2 = tmp_path / "merged2"
    code = main(["merge", "--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic",
                 "--output", str(out2), "--no-progress", "--push-to-hub", "org/merged"])
    err = capsys.readouterr().err
    assert code == 2 and "Forbidden: read-only token" in err and f"hf-atm push {out2}" in err
    assert (out2 / "model.safetensors").is_file()  # the merge itself is kept for a later `hf-atm push`
