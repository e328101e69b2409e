"""Files through the gateway: upload, use, list (own only), download, delete; and every
place another tenant could name a file id refused before anything goes upstream."""

from __future__ import annotations

import io
import json
import socket
import time

import httpx
import openai
import pytest
from harness import Server, Sim, Tenants, base_config, gateway

PDF = b"%PDF-1.4\n" + b"0123456789abcdef" * 4096 + b"\n%%EOF\n"


def _v1(gw: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=key, max_retries=0)


def _azure(gw: Server, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=gw.url, api_key=key, api_version="2025-04-01-preview", max_retries=0
    )


@pytest.mark.parametrize("form", ["v1", "azure"])
def test_upload_use_list_download_delete(gw: Server, sim: Sim, tenants: Tenants, form: str) -> None:
    key = tenants.key("team-a")
    a = _v1(gw, key) if form == "v1" else _azure(gw, key)
    f = a.files.create(file=("plan.pdf", io.BytesIO(PDF)), purpose="assistants")
    assert f.id.startswith("file-") and f.bytes == len(PDF) and f.filename == "plan.pdf"
    path = "/openai/v1/files" if form == "v1" else "/openai/files"
    upload = [r for r in sim.state.api_requests() if r.path == path][-1]
    assert PDF in upload.body and b'name="purpose"' in upload.body
    assert upload.headers["authorization"].startswith("Bearer sim-token-")

    # As input_file, JSON and stream; the upstream sees the same id.
    resp = a.responses.create(
        model="gpt-4.1",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_file", "file_id": f.id},
                    {"type": "input_text", "text": "summarise"},
                ],
            }
        ],
    )
    assert resp.status == "completed"
    assert f.id.encode() in sim.state.api_requests()[-1].body
    assert b'"model":"dep-41-swc"' in sim.state.api_requests()[-1].body
    with a.responses.stream(
        model="gpt-4.1",
        input=[{"role": "user", "content": [{"type": "input_file", "file_id": f.id}]}],
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed"

    assert [x.id for x in a.files.list()] == [f.id]
    assert a.files.retrieve(f.id).filename == "plan.pdf"
    assert a.files.content(f.id).read() == PDF
    assert a.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(f.id)


def test_azure_client_files_and_list_hides_other_tenants(
    gw: Server, sim: Sim, tenants: Tenants
) -> None:
    a = _azure(gw, tenants.key("team-a"))
    b = _azure(gw, tenants.key("team-b"))
    fa = a.files.create(file=("a-secret-name.txt", b"alpha"), purpose="assistants")
    fb = b.files.create(file=("b.txt", b"beta"), purpose="assistants")
    assert sim.state.requests[-1].query.startswith("api-version=")
    assert {x.id for x in a.files.list()} == {fa.id}
    listed = httpx.get(
        f"{gw.url}/openai/files?api-version=2025-04-01-preview",
        headers={"api-key": tenants.key("team-b")},
    )
    assert listed.status_code == 200
    assert b"a-secret-name" not in listed.content
    assert [x["id"] for x in listed.json()["data"]] == [fb.id]
    assert b.files.content(fb.id).read() == b"beta"


def test_other_tenant_cannot_name_a_file_anywhere(gw: Server, sim: Sim, tenants: Tenants) -> None:
    a = _v1(gw, tenants.key("team-a"))
    b = _v1(gw, tenants.key("team-b"))
    f = a.files.create(file=("x.pdf", PDF), purpose="assistants")
    img = a.files.create(file=("x.png", b"\x89PNG..."), purpose="vision")
    store = a.vector_stores.create(name="a-store", file_ids=[f.id])
    before = len(sim.state.api_requests())

    def create(**kw: object) -> object:
        return b.responses.create(model="gpt-4.1", **kw)  # type: ignore[arg-type]

    attempts: list[tuple[str, object]] = [
        ("file_id", lambda: b.files.retrieve(f.id)),
        ("file_id", lambda: b.files.content(f.id)),
        ("file_id", lambda: b.files.delete(f.id)),
        (
            "input[0].content[0].file_id",
            lambda: create(
                input=[{"role": "user", "content": [{"type": "input_file", "file_id": f.id}]}]
            ),
        ),
        (
            "input[0].content[0].file_id",
            lambda: create(
                input=[
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "file_id": img.id, "detail": "auto"}],
                    }
                ]
            ),
        ),
        (
            "tools[0].container.file_ids[0]",
            lambda: create(
                input="x",
                tools=[
                    {"type": "code_interpreter", "container": {"type": "auto", "file_ids": [f.id]}}
                ],
            ),
        ),
        (
            "tools[0].vector_store_ids[0]",
            lambda: create(
                input="x", tools=[{"type": "file_search", "vector_store_ids": [store.id]}]
            ),
        ),
        ("vector_store_id", lambda: b.vector_stores.files.list(store.id)),
        ("vector_store_id", lambda: b.vector_stores.search(store.id, query="q")),
    ]
    own = b.vector_stores.create(name="b-store")
    before = len(sim.state.api_requests())
    attempts.append(("file_id", lambda: b.vector_stores.files.create(own.id, file_id=f.id)))
    attempts.append(("file_ids[0]", lambda: b.vector_stores.create(name="s", file_ids=[f.id])))
    for param, attempt in attempts:
        with pytest.raises(openai.NotFoundError) as info:
            attempt()  # type: ignore[operator]
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == "not_found", param
        assert body["param"] == param
    assert len(sim.state.api_requests()) == before, "nothing reached the upstream"
    # The owner can use all of them.
    ok = a.responses.create(
        model="gpt-4.1",
        input="x",
        tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
    )
    assert ok.status == "completed"
    assert [x.id for x in a.vector_stores.files.list(store.id)] == [f.id]


def test_upload_limit_and_bad_form(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants, server={"max_upload_bytes": 1000})
    with gateway(cfg) as gw:
        a = _v1(gw, tenants.key("team-a"))
        with pytest.raises(openai.APIStatusError) as info:
            a.files.create(file=("big.bin", b"x" * 5000), purpose="assistants")
        assert info.value.status_code == 413

        # A chunked upload (no content-length) is cut off at the limit as it streams.
        def body() -> object:
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
            for _ in range(20):
                yield b"y" * 100

        r = httpx.post(
            f"{gw.url}/openai/v1/files",
            content=body(),  # type: ignore[arg-type]
            headers={
                "api-key": tenants.key("team-a"),
                "content-type": "multipart/form-data; boundary=b",
            },
        )
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        assert identity.state.files == {}
        assert "gateway_inflight_requests 0.0" in httpx.get(gw.url + "/metrics").text


def test_uploads_land_on_the_configured_resource(
    identity: Sim, sim2: Sim, tenants: Tenants
) -> None:
    cfg = base_config({"swc": identity, "frc": sim2}, tenants)
    cfg["tenants"]["team-a"]["files"] = {"resource": "frc"}
    with gateway(cfg) as gw:
        a = _v1(gw, tenants.key("team-a"))
        b = _v1(gw, tenants.key("team-b"))
        fa = a.files.create(file=("a.txt", b"a"), purpose="assistants")
        fb = b.files.create(file=("b.txt", b"b"), purpose="assistants")
        assert list(sim2.state.files) == [fa.id]  # configured
        assert list(identity.state.files) == [fb.id]  # first resource of its first model
        # Using the file pins the request to its resource, even though swc is first.
        resp = a.responses.create(
            model="gpt-4.1",
            input=[{"role": "user", "content": [{"type": "input_file", "file_id": fa.id}]}],
        )
        assert resp.status == "completed"
        assert sim2.state.api_requests()[-1].path == "/openai/v1/responses"
        assert b'"model":"dep-41-frc"' in sim2.state.api_requests()[-1].body
        # Objects on two resources cannot meet in one request.
        prev = a.responses.create(model="gpt-4.1", input="on swc first")
        assert prev.id in identity.state.responses
        before = len(identity.state.api_requests()) + len(sim2.state.api_requests())
        with pytest.raises(openai.BadRequestError) as info:
            a.responses.create(
                model="gpt-4.1",
                previous_response_id=prev.id,
                input=[{"role": "user", "content": [{"type": "input_file", "file_id": fa.id}]}],
            )
        assert info.value.code == "objects_on_different_resources"
        assert len(identity.state.api_requests()) + len(sim2.state.api_requests()) == before


def test_upload_is_checked_whole_before_anything_goes_upstream(
    gw: Server, sim: Sim, tenants: Tenants
) -> None:
    """A form is parsed and checked to its end (file parts spooled, not held in memory)
    before the upstream hears of it: a field after the file is checked like any other."""
    seen_before_end: list[bool] = []

    def body(tail: bytes) -> object:
        yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
        yield b"z" * 1_500_000
        time.sleep(0.3)
        seen_before_end.append("/openai/v1/files" in sim.state.started)
        yield b"z" * 1_500_000 + b"\r\n" + tail + b"--b--\r\n"

    headers = {
        "api-key": tenants.key("team-a"),
        "content-type": "multipart/form-data; boundary=b",
    }
    url = f"{gw.url}/openai/v1/files"
    r = httpx.post(url, content=body(b""), headers=headers, timeout=10)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert seen_before_end == [False]
    assert r.json()["bytes"] == 3_000_000
    assert r.json()["purpose"] == "assistants"
    assert sim.state.files[r.json()["id"]][1] == b"z" * 3_000_000
    # A second 'purpose' after the file: refused, nothing upstream.
    before = len(sim.state.api_requests())
    late = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
    r = httpx.post(url, content=body(late), headers=headers, timeout=10)  # type: ignore[arg-type]
    assert r.status_code == 400 and r.json()["error"]["code"] == "duplicate_field"
    assert len(sim.state.api_requests()) == before


def test_client_gone_mid_upload_frees_its_slot(identity: Sim, tenants: Tenants) -> None:
    cfg = base_config({"swc": identity}, tenants)
    cfg["tenants"]["team-a"]["quotas"] = {"max_concurrent_requests": 1}
    with gateway(cfg) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /openai/v1/files HTTP/1.1\r\nhost: x\r\n"
                + b"api-key: "
                + tenants.key("team-a").encode()
                + b"\r\n"
                + b"content-type: multipart/form-data; boundary=b\r\n"
                + b"content-length: 100000\r\n\r\n"
                + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
                + b"x" * 5000
            )
            deadline = time.monotonic() + 5
            while "gateway_inflight_requests 1.0" not in httpx.get(gw.url + "/metrics").text:
                assert time.monotonic() < deadline, "the upload never started"
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while "gateway_inflight_requests 0.0" not in httpx.get(gw.url + "/metrics").text:
            assert time.monotonic() < deadline, "the slot was never freed"
            time.sleep(0.02)
        a = _v1(gw, tenants.key("team-a"))
        assert a.files.create(file=("b.txt", b"b"), purpose="assistants").bytes == 1
        assert [f["filename"] for f, _ in identity.state.files.values()] == ["b.txt"]
        # The cut form never reached the upstream: only the whole one did.
        assert [r.path for r in identity.state.api_requests()] == ["/openai/v1/files"]


def test_list_cursors_never_name_another_tenants_object(
    gw: Server, sim: Sim, tenants: Tenants
) -> None:
    a = _v1(gw, tenants.key("team-a"))
    b = _v1(gw, tenants.key("team-b"))
    mine = a.files.create(file=("a.txt", b"a"), purpose="assistants")
    theirs = [b.files.create(file=(f"b{i}.txt", b"b"), purpose="assistants") for i in range(2)]
    page = httpx.get(gw.url + "/openai/v1/files", headers={"api-key": tenants.key("team-a")}).json()
    assert [d["id"] for d in page["data"]] == [mine.id]
    assert page["first_id"] == page["last_id"] == mine.id
    text = json.dumps(page)
    assert all(t.id not in text and t.filename not in text for t in theirs)


def test_list_reads_on_past_pages_of_other_tenants(gw: Server, sim: Sim, tenants: Tenants) -> None:
    """A page of only other tenants' items would end the SDK's paging: the gateway reads on."""
    a = _v1(gw, tenants.key("team-a"))
    b = _v1(gw, tenants.key("team-b"))
    first = a.vector_stores.create(name="a-1")
    theirs = [b.vector_stores.create(name=f"b-{i}") for i in range(7)]
    last = a.vector_stores.create(name="a-2")
    calls = len(sim.state.api_requests())
    # Pages of 2: [a-1, b0] [b1, b2] [b3, b4] [b5, b6] [a-2]; the SDK pages with after=last_id.
    listed = [s.id for s in a.vector_stores.list(limit=2)]
    assert listed == [first.id, last.id]
    walked = sim.state.api_requests()[calls:]
    assert len(walked) == 5 and all(r.path == "/openai/v1/vector_stores" for r in walked)
    page = httpx.get(
        gw.url + "/openai/v1/vector_stores?limit=2&after=" + first.id,
        headers={"api-key": tenants.key("team-a")},
    ).json()
    assert [d["id"] for d in page["data"]] == [last.id] and page["last_id"] == last.id
    assert all(t.id not in json.dumps(page) for t in theirs)
    # B sees its own seven, A's never.
    assert [s.id for s in b.vector_stores.list(limit=3)] == [t.id for t in theirs]
