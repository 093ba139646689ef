"""`heed user ...`, `heed backup` and `heed restore` from the command line: clear errors, exit codes."""
from __future__ import annotations

import io

import pytest
import yaml
from conftest import make_config

from heed.cli import main
from heed.service import Heed


@pytest.fixture
def cli(tmp_path, tiny_model_path, capsys, monkeypatch):
    config = make_config(tmp_path / "data", tiny_model_path, app={"login_max_failures": 2, "login_lockout_seconds": 600})
    path = tmp_path / "heed.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(["--config", str(path), *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    run.heed = lambda: Heed(config)
    return run


def test_user_add_list_passwd_delete(cli):
    assert cli("user", "add", "alice", "--password-stdin", stdin="first-pw\n")[0] == 0
    code, out, _ = cli("user", "list")
    assert code == 0 and "alice" in out
    assert cli("user", "passwd", "alice", "--password-stdin", stdin="second-pw\n")[0] == 0
    heed = cli.heed()
    assert heed.authenticate("alice", "first-pw") is None
    assert heed.authenticate("alice", "second-pw") == heed.user_id("alice")
    assert cli("user", "delete", "alice")[0] == 0
    assert "alice" not in cli("user", "list")[1]


@pytest.mark.parametrize("argv, stdin, message", [
    (["user", "add", "bad name", "--password-stdin"], "pw\n", "user names"),
    (["user", "add", "bob", "--password-stdin"], "\n", "password"),
    (["user", "delete", "nobody"], "", "no user named"),
    (["user", "passwd", "nobody", "--password-stdin"], "pw\n", "no user named"),
    (["user", "unlock", "nobody"], "", "no user named"),
    (["user", "delete"], "", "NAME is required"),
])
def test_user_commands_fail_clearly(cli, argv, stdin, message):
    code, out, err = cli(*argv, stdin=stdin)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_second_user_with_the_same_name_is_refused(cli):
    cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
    code, _, err = cli("user", "add", "alice", "--password-stdin", stdin="other\n")
    assert code == 2 and "already exists" in err
    assert cli.heed().authenticate("alice", "pw") is not None


def test_a_locked_account_shows_in_the_list_and_unlock_opens_it(cli):
    cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
    heed = cli.heed()
    for _ in range(2):
        heed.authenticate("alice", "wrong")
    assert heed.authenticate("alice", "pw") is None
    assert "locked until" in cli("user", "list")[1]
    assert cli("user", "unlock", "alice")[0] == 0
    assert "locked" not in cli("user", "list")[1]
    assert heed.authenticate("alice", "pw") == heed.user_id("alice")


def test_backup_and_restore_errors_are_clear(cli, tmp_path):
    cli("user", "add", "alice", "--password-stdin", stdin="pw\n")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x").write_text("x")
    code, _, err = cli("backup", str(tmp_path / "occupied"))
    assert code == 2 and "not an empty folder" in err
    code, _, err = cli("restore", str(tmp_path / "occupied"))
    assert code == 2 and "not a Heed backup" in err
    assert cli("backup", str(tmp_path / "b"))[0] == 0
    code, _, err = cli("restore", str(tmp_path / "b"))
    assert code == 2 and "already holds 1 users" in err
    assert cli("restore", "--force", str(tmp_path / "b"))[0] == 0


def test_bench_help_lists_every_benchmark(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("personalize", "perf", "load", "gate-audit", "gate-bounds", "rejudge", "report"):
        assert name in out
    with pytest.raises(SystemExit):
        main(["user", "list", "--no-such-option"])
