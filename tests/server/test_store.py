"""The SQL store on SQLite and PostgreSQL: migrations, tokens, idempotent writes, the leaderboard."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel, select

from inco_core.progress import EpochLog
from server.errors import Conflict
from server.store import access
from server.store.db import migrate, schema_is_current, session_scope
from server.store.models import ApiToken, Artifact, JobCreate, JobStatus, Metric


def _job(engine, team_name: str = "alpha"):
    with session_scope(engine) as s:
        team = access.ensure_team(s, name=team_name)
        req = JobCreate.model_validate({"spec": {"data": {"dataset": "default"}, "preset": "smoke"}})
        return team.id, access.create_job(s, team_id=team.id, request=req, spec=req.spec.model_dump(mode="json"))


def test_migrations_build_exactly_the_models(engine) -> None:
    assert schema_is_current(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def test_tokens_are_stored_hashed_and_can_be_revoked(engine) -> None:
    with session_scope(engine) as s:
        team = access.ensure_team(s, name="alpha")
        token = access.create_token(s, team=team)
    with session_scope(engine) as s:
        rows = s.exec(select(ApiToken)).all()
        assert len(rows) == 1 and token not in (rows[0].token_hash, rows[0].prefix) and len(rows[0].token_hash) == 64
        assert access.team_for_token(s, token=token).name == "alpha"
        assert access.team_for_token(s, token=token + "x") is None
        assert access.revoke_token(s, prefix=token[:12]) == 1
    with session_scope(engine) as s:
        assert access.team_for_token(s, token=token) is None


def test_metrics_and_results_are_never_duplicated(engine) -> None:
    team_id, job = _job(engine)
    with session_scope(engine) as s:
        access.add_metric(s, job_id=job.id, log=EpochLog("pretrain", 1, 2, {"loss": 3.0}))
        access.add_metric(s, job_id=job.id, log=EpochLog("pretrain", 2, 2, {"loss": 2.0, "nan": float("nan")}))
    with session_scope(engine) as s:  # a resumed attempt reports epoch 2 again
        access.add_metric(s, job_id=job.id, log=EpochLog("pretrain", 2, 2, {"loss": 1.5}))
    with session_scope(engine) as s:
        rows = access.list_metrics(s, job_id=job.id)
        assert [(m.epoch, m.values) for m in rows] == [(1, {"loss": 3.0}), (2, {"loss": 1.5})]
        assert len(s.exec(select(Metric)).all()) == 2
    result = _result_dict([0.5])
    for _ in range(2):
        with session_scope(engine) as s:
            access.add_results(s, job=access.get_job(s, job_id=job.id, team_id=None), result=result, dataset="d")
    with session_scope(engine) as s:
        assert len(access.list_results(s, team_id=team_id)) == 1


def _result_dict(accuracies: list[float], ratio: str = "1:16") -> dict:
    return {
        "results": [
            {
                "method": "inco",
                "variant": "InCo with DWV",
                "ratio": ratio,
                "eval": "finetune",
                "seed": seed,
                "accuracy": acc,
                "per_class_recall": {"a": acc, "b": acc},
                "confusion_matrix": [[1, 0], [0, 1]],
                "classes": ["a", "b"],
                "labelled_images": 10,
                "test_images": 2,
                "wall_time_s": 1.0,
                "pretrain_key": "k",
            }
            for seed, acc in enumerate(accuracies)
        ],
        "spec": {"preset": "smoke"},
        "hardware": "cpu",
        "code_version": "0.1.0",
        "data": {"fingerprint": "f" * 16},
    }


def test_leaderboard_mean_and_sample_std_over_seeds(engine) -> None:
    team_id, job = _job(engine)
    with session_scope(engine) as s:
        j = access.get_job(s, job_id=job.id, team_id=None)
        access.add_results(s, job=j, result=_result_dict([0.6, 0.7, 0.8]), dataset="d")
        access.add_results(s, job=j, result=_result_dict([0.9], ratio="1:2"), dataset="d")
    with session_scope(engine) as s:
        board = access.leaderboard(access.list_results(s, team_id=team_id))
    assert [(r.ratio, r.count) for r in board] == [("1:2", 1), ("1:16", 3)]
    assert board[1].mean == pytest.approx(0.7) and board[1].std == pytest.approx(0.1)
    assert board[0].std == 0.0 and board[1].seeds == [0, 1, 2]


def test_a_job_keeps_its_first_ending(engine) -> None:
    _, job = _job(engine)
    with session_scope(engine) as s:
        access.request_cancel(s, job=access.get_job(s, job_id=job.id, team_id=None))
    with session_scope(engine) as s:
        assert access.finish_job(s, job_id=job.id, status=JobStatus.succeeded) is None  # a late worker
        again = access.get_job(s, job_id=job.id, team_id=None)
        assert again.status == JobStatus.canceled and again.finished_at is not None
        with pytest.raises(Conflict, match="already ended canceled"):
            access.request_cancel(s, job=again)
        assert access.start_attempt(s, job_id=job.id, worker="w") is None


def test_an_artifact_is_recorded_once_per_key(engine) -> None:
    team_id, job = _job(engine)
    for path in ("/a.pt", "/b.pt"):
        with session_scope(engine) as s:
            access.add_artifact(
                s,
                artifact=Artifact(
                    team_id=team_id,
                    job_id=job.id,
                    kind="backbone",
                    key="k1",
                    method="inco",
                    seed=0,
                    path=path,
                    size_bytes=1,
                ),
            )
    with session_scope(engine) as s:
        arts = access.list_artifacts(s, team_id=team_id)
        assert [a.path for a in arts] == ["/a.pt"]


def test_upgrading_a_store_keeps_its_rows(db_url: str) -> None:
    """A store at the first revision, with a result in it, upgraded to the newest schema."""
    from alembic import command
    from sqlalchemy import text

    from server.store.db import _alembic_config, make_engine

    engine = make_engine(db_url)
    with engine.begin() as conn:  # the fixture may have migrated an emptied database already
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table.name}")
    command.upgrade(_alembic_config(engine), "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO teams (name, created_at) VALUES ('alpha', CURRENT_TIMESTAMP)"))
        conn.execute(
            text(
                "INSERT INTO jobs (id, kind, team_id, spec, status, created_at, attempts, cancel_requested, outputs) "
                "VALUES ('j1', 'experiment', 1, '{}', 'succeeded', CURRENT_TIMESTAMP, 1, false, '{}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO results (job_id, team_id, dataset, preset, method, variant, ratio, eval, seed, accuracy, "
                "per_class_recall, confusion_matrix, classes, labelled_images, test_images, wall_time_s, hardware, "
                "code_version, data_fingerprint, created_at) VALUES ('j1', 1, 'd', 'cpu', 'inco', 'InCo with DWV', "
                "'1:16', 'finetune', 0, 0.9, '{}', '[]', '[]', 66, 720, 1.0, 'cpu', 'v', 'f', CURRENT_TIMESTAMP)"
            )
        )
    assert not schema_is_current(engine)
    migrate(engine)
    assert schema_is_current(engine)
    with session_scope(engine) as s:
        (row,) = access.list_results(s, team_id=1)
        assert (row.accuracy, row.setup) == (0.9, "")
    engine.dispose()


def test_results_of_other_setups_are_not_averaged_together(engine) -> None:
    team_id, job = _job(engine)
    tuned = {**_result_dict([0.4]), "spec": {"preset": "smoke", "overrides": {"pretrain": {"epochs": 3}}}}
    paper = {
        **_result_dict([0.2]),
        "spec": {"preset": "smoke", "optimizer": "paper-literal", "overrides": {"pretrain.inco.a_f": 0}},
    }
    with session_scope(engine) as s:
        j = access.get_job(s, job_id=job.id, team_id=None)
        access.add_results(s, job=j, result=_result_dict([0.6]), dataset="d")
    for result in (tuned, paper):
        with session_scope(engine) as s:
            _, other = _job(engine)
            access.add_results(s, job=access.get_job(s, job_id=other.id, team_id=None), result=result, dataset="d")
    with session_scope(engine) as s:
        board = access.leaderboard(access.list_results(s, team_id=team_id))
    assert sorted((r.setup, r.mean) for r in board) == [
        ("", 0.6),
        ("optimizer=paper-literal", 0.2),
        ("pretrain.epochs=3", 0.4),
    ]
