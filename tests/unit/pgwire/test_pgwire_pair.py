"""A client and a server speaking through the codec alone, no sockets (as h11's tests do)."""

from __future__ import annotations

from dbgov_sidecar.pgwire import auth, framing, messages


class _Server:
    """Just enough of a PostgreSQL server: SCRAM login, one simple query, one extended query."""

    def __init__(self) -> None:
        self.framer = framing.Framer(side="frontend", startup=True)
        self.scram = auth.ScramServer(keys=auth.scram_keys("s3cret", salt=b"saltsaltsaltsalt"), nonce="SRV")
        self.user = ""

    def receive(self, data: bytes) -> bytes:
        self.framer.feed(data)
        out = b""
        while (msg := self.framer.next_message()) is not None:
            out += self._handle(msg)
        return out

    def _handle(self, msg: framing.Message) -> bytes:
        if msg.type == framing.STARTUP:
            startup = messages.decode_startup(msg.data)
            if isinstance(startup, messages.SSLRequest):
                return b"N"
            assert isinstance(startup, messages.StartupMessage)
            self.user = startup.params["user"]
            return messages.authentication_sasl([auth.SCRAM_SHA_256])
        if msg.type == messages.PASSWORD and not self.scram_started():
            mech, first = messages.decode_sasl_initial_response(msg.data)
            assert mech == auth.SCRAM_SHA_256
            return messages.authentication(messages.AUTH_SASL_CONTINUE, self.scram.server_first(first))
        if msg.type == messages.PASSWORD:
            final = self.scram.server_final(messages.decode_password(msg.data))
            return (
                messages.authentication(messages.AUTH_SASL_FINAL, final)
                + messages.authentication(messages.AUTH_OK)
                + messages.parameter_status("server_version", "16.0")
                + messages.backend_key_data(42, 4242)
                + messages.ready_for_query("I")
            )
        if msg.type == messages.QUERY:
            sql = messages.decode_query(msg.data)
            return self._result(sql) + messages.ready_for_query("I")
        if msg.type == messages.PARSE:
            return messages.PARSE_COMPLETE_MESSAGE
        if msg.type == messages.BIND:
            return messages.BIND_COMPLETE_MESSAGE
        if msg.type == messages.EXECUTE:
            return self._result("bound")[len(self._description()) :]
        if msg.type == messages.SYNC:
            return messages.ready_for_query("I")
        raise AssertionError(f"unexpected {chr(msg.type)}")

    def scram_started(self) -> bool:
        return bool(self.scram._full_nonce)

    def _description(self) -> bytes:
        return messages.row_description(
            [
                messages.Field(
                    name="echo",
                    table_oid=0,
                    attnum=0,
                    type_oid=25,
                    type_size=-1,
                    type_modifier=-1,
                    format=0,
                )
            ]
        )

    def _result(self, text: str) -> bytes:
        return (
            self._description() + messages.data_row([text.encode()]) + messages.command_complete("SELECT 1")
        )


def test_scram_login_and_queries_through_the_codec() -> None:
    server = _Server()
    client_framer = framing.Framer(side="backend")
    scram = auth.ScramClient(password="s3cret", nonce="CLI")

    reply = server.receive(messages.ssl_request())
    assert reply == b"N"
    client_framer.feed(server.receive(messages.startup_message({"user": "app"})))
    msg = client_framer.next_message()
    assert msg is not None
    code, payload = messages.decode_authentication(msg.data)
    assert code == messages.AUTH_SASL and messages.decode_sasl_mechanisms(payload) == [auth.SCRAM_SHA_256]
    client_framer.feed(
        server.receive(messages.sasl_initial_response(auth.SCRAM_SHA_256, scram.client_first()))
    )
    msg = client_framer.next_message()
    assert msg is not None
    code, server_first = messages.decode_authentication(msg.data)
    assert code == messages.AUTH_SASL_CONTINUE
    client_framer.feed(server.receive(messages.password_message(scram.client_final(server_first))))
    chunk, msgs = client_framer.drain()
    code, server_final = messages.decode_authentication(msgs[0].data)
    assert code == messages.AUTH_SASL_FINAL
    scram.verify_server_final(server_final)
    assert [chr(m.type) for m in msgs] == list("RRSKZ")
    assert messages.decode_backend_key_data(msgs[3].data) == (42, 4242)
    assert b"".join(m.data for m in msgs) == chunk

    client_framer.feed(server.receive(messages.query("hello")))
    _, msgs = client_framer.drain()
    assert [chr(m.type) for m in msgs] == list("TDCZ")
    assert messages.decode_data_row(msgs[1].data) == [b"hello"]

    pipeline = (
        messages.parse("", "SELECT $1")
        + messages.bind("", "", [b"x"])
        + messages.execute()
        + messages.SYNC_MESSAGE
    )
    client_framer.feed(server.receive(pipeline))
    _, msgs = client_framer.drain()
    assert [chr(m.type) for m in msgs] == list("12DCZ")
    assert messages.decode_ready_for_query(msgs[-1].data) == "I"
