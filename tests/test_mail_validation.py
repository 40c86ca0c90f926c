"""Mail validation (mailoutbox.mail.prepare): pure, no database.

Every rejection is an InvalidMail naming the offending field; every accepted
mail comes out as the payload and recipients enqueue stores.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import pytest

from mailoutbox.errors import InvalidMail
from mailoutbox.mail import Mail, PreparedMail, prepare
from mailoutbox.records import Recipient
from mailoutbox.schema import Kind

SENDER = "noreply@example.com"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


def make(**overrides: Any) -> Mail:
    values: dict[str, Any] = {
        "template_id": "welcome",
        "idempotency_key": "user-42",
        "to": ["alice@example.com"],
        "subject": "Hello",
        "text": "Hi Alice",
    }
    values.update(overrides)
    return Mail(**values)


def ok(mail: Mail, **kwargs: Any) -> PreparedMail:
    kwargs.setdefault("default_sender", SENDER)
    return prepare(mail, **kwargs)


def rejected(mail: Mail, **kwargs: Any) -> InvalidMail:
    kwargs.setdefault("default_sender", SENDER)
    with pytest.raises(InvalidMail) as info:
        prepare(mail, **kwargs)
    return info.value


# --- recipients and addresses --------------------------------------------------------------


def test_no_recipient_is_rejected() -> None:
    """A mail without to, cc or bcc is InvalidMail on `to`."""
    assert rejected(make(to=[])).field == "to"


MALFORMED = [
    pytest.param("alice.example.com", id="missing-at"),
    pytest.param("ali ce@example.com", id="space-in-local-part"),
    pytest.param("alice@exam ple.com", id="space-in-domain"),
    pytest.param("Alice <al ice@example.com>", id="space-inside-angle-brackets"),
    pytest.param("alice@bob@example.com", id="two-at"),
    pytest.param("alice@@example.com", id="double-at"),
    pytest.param("alice@-example.com", id="label-starts-with-hyphen"),
    pytest.param("alice@exa_mple.com", id="underscore-in-label"),
    pytest.param("alice@example..com", id="empty-label"),
    pytest.param("alice@example.com.", id="trailing-dot"),
    pytest.param("alice.@example.com", id="local-part-trailing-dot"),
    pytest.param("@example.com", id="empty-local-part"),
    pytest.param("alice@", id="empty-domain"),
    pytest.param("alice@exämple.com", id="non-ascii-domain"),
    pytest.param("<alice@example.com", id="unclosed-angle-bracket"),
    pytest.param("Alice <alice@example.com> trailing", id="text-after-address"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("address", MALFORMED)
def test_malformed_address_is_rejected(address: str) -> None:
    """A malformed recipient address is InvalidMail on the recipient's field."""
    assert rejected(make(to=[address])).field == "to"


@pytest.mark.parametrize("field", ["cc", "bcc", "reply_to", "sender"])
def test_malformed_address_names_its_field(field: str) -> None:
    """The error names the field that held the malformed address."""
    value: Any = "bob@exam ple.com" if field == "sender" else ["bob@exam ple.com"]
    assert rejected(make(**{field: value})).field == field


def test_several_addresses_in_one_string_are_rejected() -> None:
    """ "a, b" in one list item is an error, not silently the first address."""
    assert rejected(make(to=["A <a@example.com>, B <b@example.com>"])).field == "to"


def test_to_given_as_a_string_is_one_address() -> None:
    """A single string for `to` is taken as a one-address list."""
    prepared = ok(make(to="bob@example.com"))
    assert prepared.recipients == (Recipient("bob@example.com", Kind.TO),)


# --- control characters ----------------------------------------------------------------------

CONTROL = [
    pytest.param("\r", id="CR"),
    pytest.param("\n", id="LF"),
    pytest.param("\r\n", id="CRLF"),
    pytest.param("\x00", id="NUL"),
    pytest.param("\t", id="TAB"),
    pytest.param("\x1b", id="ESC"),
    pytest.param("\x7f", id="DEL"),
    pytest.param("\x85", id="NEL"),
    pytest.param("\u2028", id="LINE-SEPARATOR"),
    pytest.param("\u2029", id="PARAGRAPH-SEPARATOR"),
]


@pytest.mark.parametrize("char", CONTROL)
def test_control_character_in_subject_is_rejected(char: str) -> None:
    """A line break or control character in the subject is InvalidMail on `subject`."""
    assert rejected(make(subject=f"Hello{char}Bcc: victim@example.com")).field == "subject"


@pytest.mark.parametrize("char", CONTROL)
def test_control_character_in_display_name_is_rejected(char: str) -> None:
    """A control character in a display name is InvalidMail on that address's field."""
    assert rejected(make(cc=[f"Bob{char}Smith <bob@example.com>"])).field == "cc"


@pytest.mark.parametrize("char", CONTROL)
def test_control_character_in_header_value_is_rejected(char: str) -> None:
    """A control character in an extra header's value is InvalidMail naming the header."""
    error = rejected(make(headers={"X-Campaign": f"spring{char}sale"}))
    assert error.field == "header X-Campaign"


@pytest.mark.parametrize("char", CONTROL)
def test_control_character_in_address_is_rejected(char: str) -> None:
    """A control character inside an address is InvalidMail (no header injection)."""
    assert rejected(make(to=[f"alice@example.com{char}Bcc: x@example.com"])).field == "to"


@pytest.mark.parametrize("char", CONTROL)
def test_control_character_in_sender_is_rejected(char: str) -> None:
    """A control character in the sender is InvalidMail on `sender`."""
    assert rejected(make(sender=f"Shop{char} <shop@example.com>")).field == "sender"


def test_nul_in_text_is_rejected() -> None:
    """Bodies may hold line breaks but no NUL (PostgreSQL text cannot store it)."""
    assert rejected(make(text="a\x00b")).field == "text"


def test_line_breaks_in_body_are_accepted() -> None:
    """Line breaks and tabs are fine in text and html bodies."""
    prepared = ok(make(text="a\r\nb\n\tc", html="<p>\n</p>"))
    assert prepared.payload.body == b"a\r\nb\n\tc"


# --- extra headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("X-A:B", id="colon"),
        pytest.param("X A", id="space"),
        pytest.param("X-A\r\nBcc", id="CRLF"),
        pytest.param("", id="empty"),
        pytest.param("X-Grüße", id="non-ascii"),
        pytest.param("X-" + "a" * 80, id="too-long"),
    ],
)
def test_malformed_header_name_is_rejected(name: str) -> None:
    """A header name with a colon, space or other non-ftext character is rejected."""
    assert rejected(make(headers={name: "v"})).field == "headers"


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Reply-To",
        "Message-ID",
        "Date",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Sender",
        "bcc",
        "MESSAGE-ID",
    ],
)
def test_owned_header_is_rejected(name: str) -> None:
    """Headers the outbox writes itself cannot be set through `headers` (any case)."""
    assert rejected(make(headers={name: "x@example.com"})).field == "headers"


@pytest.mark.parametrize("headers", [[("X-A", "1", "extra")], ["ab", "XY"], [b"ab"]])
def test_headers_that_are_not_pairs_are_rejected(headers: list[Any]) -> None:
    """`headers` must be a mapping or (name, value) pairs: a two-character string is not
    one (it was taken for the header "a" with the value "b")."""
    assert rejected(make(headers=headers)).field == "headers"


def test_non_string_header_value_is_rejected() -> None:
    """A header value must be a string."""
    assert rejected(make(headers={"X-Count": 3})).field == "header X-Count"


# --- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["template_id", "idempotency_key"])
@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_empty_or_blank_key_is_rejected(field: str, value: str) -> None:
    """template_id and idempotency_key must be non-blank strings."""
    assert rejected(make(**{field: value})).field == field


@pytest.mark.parametrize("field", ["template_id", "idempotency_key"])
def test_non_string_key_is_rejected(field: str) -> None:
    """template_id and idempotency_key must be strings (no implicit str())."""
    assert rejected(make(**{field: 42})).field == field


# --- bodies and size -------------------------------------------------------------------------


def test_neither_text_nor_html_is_rejected() -> None:
    """A mail needs text, html, or both."""
    assert rejected(make(text=None, html=None)).field == "text"


def test_payload_over_the_limit_is_rejected() -> None:
    """Payloads larger than max_payload_bytes are InvalidMail on `body`."""
    assert rejected(make(text="x" * 1001), max_payload_bytes=1000).field == "body"


def test_payload_limit_counts_html_subject_and_headers() -> None:
    """The limit covers every stored part, not just the text."""
    mail = make(text="x" * 400, html="y" * 400, subject="s" * 100, headers={"X-A": "v" * 200})
    assert rejected(mail, max_payload_bytes=1000).field == "body"


def test_payload_at_the_limit_is_accepted() -> None:
    """A payload of exactly max_payload_bytes is accepted."""
    ok(make(text="x" * 995, subject="Hello"), max_payload_bytes=1000)


# --- scheduling ------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [timedelta(0), timedelta(seconds=-1)], ids=["equal", "before"])
def test_expiry_not_after_send_at_is_rejected(delta: timedelta) -> None:
    """expires_at must be strictly after send_at."""
    error = rejected(make(send_at=T0, expires_at=T0 + delta))
    assert error.field == "expires_at"


@pytest.mark.parametrize("field", ["send_at", "expires_at"])
def test_naive_datetime_is_rejected(field: str) -> None:
    """send_at and expires_at must be timezone-aware."""
    assert rejected(make(**{field: datetime(2030, 1, 1, 12, 0)})).field == field


@pytest.mark.parametrize("field", ["send_at", "expires_at"])
def test_non_datetime_schedule_is_rejected(field: str) -> None:
    """send_at and expires_at must be datetimes."""
    assert rejected(make(**{field: "2030-01-01"})).field == field


@pytest.mark.parametrize("field", ["send_at", "expires_at"])
@pytest.mark.parametrize(
    "when",
    [
        datetime.max.replace(tzinfo=timezone.utc),
        datetime(1, 1, 1, 1, tzinfo=timezone.utc),
        datetime(1969, 12, 31, 23, 59, tzinfo=timezone.utc),
    ],
)
def test_a_time_no_session_time_zone_can_read_back_is_rejected(field: str, when: datetime) -> None:
    """datetime.max as "never expires" was stored; read in a session time zone east of
    UTC it is year 10000, which Python cannot hold: every read of the row failed, and
    the worker that claimed it left it `sending` for good."""
    error = rejected(make(**{field: when}))
    assert error.field == field and "between 1970-01-01 and 9000-01-01" in str(error)


def test_schedule_is_kept() -> None:
    """Valid send_at and expires_at are passed through unchanged."""
    prepared = ok(make(send_at=T0, expires_at=T0 + timedelta(hours=1)))
    assert (prepared.send_at, prepared.expires_at) == (T0, T0 + timedelta(hours=1))


# --- sender ----------------------------------------------------------------------------------


def test_no_sender_and_no_default_sender_is_rejected() -> None:
    """Without Mail.sender and without a default_sender there is no From."""
    assert rejected(make(), default_sender=None).field == "sender"


def test_default_sender_is_the_fallback() -> None:
    """Without Mail.sender the outbox's default_sender is used."""
    assert ok(make(), default_sender="Shop <shop@example.com>").payload.sender == (
        "Shop <shop@example.com>"
    )


def test_mail_sender_wins_over_default_sender() -> None:
    """Mail.sender, when given, is used instead of default_sender."""
    assert ok(make(sender="billing@example.com")).payload.sender == "billing@example.com"


def test_malformed_default_sender_is_rejected() -> None:
    """A malformed default_sender is InvalidMail on `sender`."""
    assert rejected(make(), default_sender="not an address").field == "sender"


# --- accepted mail ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("  alice@example.com ", "alice@example.com"),
        ("<alice@example.com>", "alice@example.com"),
        ("Alice   Smith <alice@example.com>", "Alice Smith <alice@example.com>"),
        ('"Smith, Alice" <alice@example.com>', '"Smith, Alice" <alice@example.com>'),
        ("Alice.Smith <alice@example.com>", '"Alice.Smith" <alice@example.com>'),
    ],
)
def test_display_name_addresses_are_normalised(given: str, stored: str) -> None:
    """Addresses are stored in one canonical form, display names kept (quoted when needed)."""
    assert ok(make(to=[given])).recipients == (Recipient(stored, Kind.TO),)


def test_non_ascii_display_name_is_accepted() -> None:
    """Display names may be any Unicode; the address stays ASCII."""
    prepared = ok(make(to=["Jörg Müller <joerg@example.com>"]))
    assert prepared.recipients[0].address.endswith("<joerg@example.com>")


def test_recipients_keep_kind_and_order() -> None:
    """Recipients are stored to, cc, bcc, each in the order given."""
    prepared = ok(
        make(
            to=["a@example.com", "b@example.com"],
            cc=["c@example.com"],
            bcc=["d@example.com", "e@example.com"],
        )
    )
    assert prepared.recipients == (
        Recipient("a@example.com", Kind.TO),
        Recipient("b@example.com", Kind.TO),
        Recipient("c@example.com", Kind.CC),
        Recipient("d@example.com", Kind.BCC),
        Recipient("e@example.com", Kind.BCC),
    )


def test_bcc_only_is_enough() -> None:
    """A mail with only bcc recipients is valid."""
    assert ok(make(to=[], bcc=["hidden@example.com"])).recipients == (
        Recipient("hidden@example.com", Kind.BCC),
    )


def test_too_many_recipients_are_rejected() -> None:
    """More than 1000 recipients is InvalidMail."""
    assert rejected(make(to=[f"u{i}@example.com" for i in range(1001)])).field == "to"


def test_reply_to_becomes_the_first_extra_header() -> None:
    """reply_to is stored as a Reply-To header, ahead of the caller's headers."""
    prepared = ok(
        make(reply_to=["Help <help@example.com>", "ops@example.com"], headers={"X-A": "1"})
    )
    assert list(prepared.payload.headers) == [
        ("Reply-To", "Help <help@example.com>, ops@example.com"),
        ("X-A", "1"),
    ]


def test_headers_as_mapping_keep_their_order() -> None:
    """A mapping of headers is stored in its iteration order."""
    prepared = ok(make(headers={"X-B": "2", "X-A": "1"}))
    assert list(prepared.payload.headers) == [("X-B", "2"), ("X-A", "1")]


def test_headers_as_pairs_allow_repeats() -> None:
    """A list of pairs may repeat a header name; order is kept."""
    prepared = ok(make(headers=[("X-Tag", "a"), ("X-Other", "b"), ("X-Tag", "c")]))
    assert list(prepared.payload.headers) == [("X-Tag", "a"), ("X-Other", "b"), ("X-Tag", "c")]


def test_text_only_is_text_plain() -> None:
    """Text alone is stored as text/plain, UTF-8 encoded."""
    payload = ok(make(text="Grüße", html=None)).payload
    assert (payload.content_type, payload.body, payload.html_body) == (
        "text/plain",
        "Grüße".encode(),
        None,
    )


def test_html_only_is_text_html() -> None:
    """HTML alone is stored as text/html, UTF-8 encoded."""
    payload = ok(make(text=None, html="<p>Grüße</p>")).payload
    assert (payload.content_type, payload.body) == ("text/html", "<p>Grüße</p>".encode())


def test_text_and_html_is_multipart_alternative() -> None:
    """Text and HTML together are stored as multipart/alternative parts."""
    payload = ok(make(text="Hi", html="<p>Hi</p>")).payload
    assert (payload.content_type, payload.body, payload.html_body) == (
        "multipart/alternative",
        b"Hi",
        "<p>Hi</p>",
    )


def test_subject_may_be_none() -> None:
    """A mail without a subject is valid and stores None."""
    assert ok(make(subject=None)).payload.subject is None


# --- from_message ----------------------------------------------------------------------------


@pytest.fixture
def message() -> Iterator[EmailMessage]:
    msg = EmailMessage()
    msg["From"] = "Billing <billing@example.com>"
    msg["To"] = "Jörg <joerg@example.com>, bob@example.com"
    msg["Cc"] = "carol@example.com"
    msg["Bcc"] = "audit@example.com"
    msg["Reply-To"] = "help@example.com"
    msg["Subject"] = "Invoice ✓"
    msg["X-Invoice"] = "2024-001"
    msg.set_content("Please find the invoice attached.")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="i.pdf")
    yield msg


def test_from_message_picks_recipients_by_kind(message: EmailMessage) -> None:
    """To, Cc and Bcc of the message become the recipients, in order."""
    mail = Mail.from_message(message, template_id="invoice", idempotency_key="i-1")
    prepared = ok(mail)
    assert [(r.kind, r.address.rpartition("<")[2].rstrip(">")) for r in prepared.recipients] == [
        (Kind.TO, "joerg@example.com"),
        (Kind.TO, "bob@example.com"),
        (Kind.CC, "carol@example.com"),
        (Kind.BCC, "audit@example.com"),
    ]


def test_from_message_picks_subject_sender_and_reply_to(message: EmailMessage) -> None:
    """Subject, From and Reply-To come from the message's headers."""
    payload = ok(Mail.from_message(message, template_id="invoice", idempotency_key="i-1")).payload
    assert payload.subject == "Invoice ✓"
    assert payload.sender == "Billing <billing@example.com>"
    assert list(payload.headers) == [("Reply-To", "help@example.com")]


def test_from_message_with_several_authors_is_invalid(message: EmailMessage) -> None:
    """The outbox sends as one sender: keeping the first author dropped the others."""
    del message["From"]
    message["From"] = "Alice <alice@example.com>, Bob <bob@example.com>"
    with pytest.raises(InvalidMail) as info:
        Mail.from_message(message, template_id="t", idempotency_key="k")
    assert info.value.field == "sender"


def test_from_message_strips_owned_headers_from_the_stored_body(message: EmailMessage) -> None:
    """The stored MIME body keeps its own headers but not From/To/Cc/Bcc/Subject/Reply-To."""
    payload = ok(Mail.from_message(message, template_id="invoice", idempotency_key="i-1")).payload
    stored = email.message_from_bytes(payload.body, policy=email.policy.default)
    assert payload.content_type == "message/rfc822"
    assert stored["X-Invoice"] == "2024-001"
    for name in ("From", "To", "Cc", "Bcc", "Subject", "Reply-To"):
        assert name not in stored
    assert b"audit@example.com" not in payload.body


def test_from_message_stores_a_7bit_body() -> None:
    """Non-ASCII text EmailMessage holds as 8bit is stored quoted-printable, once."""
    msg = EmailMessage()
    msg["To"] = "a@example.com"
    msg.set_content("Grüße aus Köln, bis bald wieder.")
    body = ok(Mail.from_message(msg, template_id="t", idempotency_key="k")).payload.body
    assert body.isascii()
    stored = email.message_from_bytes(body, policy=email.policy.default)
    assert stored["Content-Transfer-Encoding"] == "quoted-printable"
    assert stored.get_content() == "Grüße aus Köln, bis bald wieder.\r\n"


def test_from_message_decodes_compat32_headers() -> None:
    """A message parsed with the default compat32 policy has its folded, encoded headers decoded."""
    raw = (
        b"From: =?utf-8?b?SsO2cmc=?= <joerg@example.com>\r\n"
        b'To: "Doe, J" <a@example.com>,\r\n =?utf-8?q?Gr=C3=BC=C3=9Fe?= <b@example.com>\r\n'
        b"Subject: =?utf-8?b?R3LDvMOfZQ==?= from a subject that\r\n was folded\r\n"
        b"\r\nbody\r\n"
    )
    prepared = ok(
        Mail.from_message(email.message_from_bytes(raw), template_id="t", idempotency_key="k")
    )
    assert prepared.payload.subject == "Grüße from a subject that was folded"
    assert [r.address for r in prepared.recipients] == [
        '"Doe, J" <a@example.com>',
        "Grüße <b@example.com>",
    ]
    assert prepared.payload.sender == "Jörg <joerg@example.com>"


def test_from_message_with_text_is_rejected(message: EmailMessage) -> None:
    """A mail built from a message takes no separate text or html."""
    mail = Mail.from_message(message, template_id="invoice", idempotency_key="i-1")
    assert rejected(dataclasses.replace(mail, text="also")).field == "message"


def test_from_message_needs_a_message() -> None:
    """from_message rejects anything that is not an email.message.Message."""
    with pytest.raises(InvalidMail) as info:
        Mail.from_message(
            "From: a@example.com",  # type: ignore[arg-type]
            template_id="t",
            idempotency_key="k",
        )
    assert info.value.field == "message"


def test_from_message_with_control_character_in_address_is_rejected() -> None:
    """A raw control character in an address header of the message is InvalidMail."""
    msg = email.message_from_bytes(b"From: a@example.com\r\nTo: b@example.com\x1b\r\n\r\nx\r\n")
    with pytest.raises(InvalidMail) as info:
        Mail.from_message(msg, template_id="t", idempotency_key="k")
    assert info.value.field == "to"


def test_prepare_rejects_what_is_not_a_mail() -> None:
    """prepare() takes a Mail and nothing else."""
    with pytest.raises(InvalidMail):
        prepare({"to": ["a@example.com"]}, default_sender=SENDER)  # type: ignore[arg-type]


def test_deeply_nested_comments_in_an_address_are_invalid_mail() -> None:
    """An address of thousands of nested '(' is InvalidMail, not a RecursionError."""
    hostile = "(" * 5000 + "a@example.com"
    assert (
        rejected(Mail(template_id="t", idempotency_key="k", cc=[hostile], text="x")).field == "cc"
    )


def from_raw(raw: bytes, policy: email.policy.Policy = email.policy.compat32) -> Mail:
    return Mail.from_message(
        email.message_from_bytes(raw, policy=policy),
        template_id="t",
        idempotency_key="k",
    )


PARSE_POLICIES = [
    pytest.param(email.policy.compat32, id="compat32"),
    pytest.param(email.policy.default, id="default"),
]


@pytest.mark.parametrize("policy", PARSE_POLICIES)
def test_from_message_reads_raw_utf8_headers(policy: email.policy.Policy) -> None:
    """Raw UTF-8 in From/To/Cc/Subject (RFC 6532) is read as the text it spells."""
    raw = (
        "From: Jörg <joerg@example.com>\r\nTo: Zoë <zoe@example.com>\r\n"
        "Cc: Ünal <uenal@example.com>\r\nSubject: Grüße\r\n\r\nhi\r\n"
    ).encode()
    prepared = ok(from_raw(raw, policy))
    assert prepared.payload.subject == "Grüße"
    assert prepared.payload.sender == "Jörg <joerg@example.com>"
    assert [r.address for r in prepared.recipients] == [
        "Zoë <zoe@example.com>",
        "Ünal <uenal@example.com>",
    ]


@pytest.mark.parametrize("policy", PARSE_POLICIES)
@pytest.mark.parametrize(
    ("header", "field"),
    [
        pytest.param("Subject: Gr\xfc\xdfe", "subject", id="subject"),
        pytest.param("To: J\xf6rg <joerg@example.com>", "to", id="to"),
        pytest.param("X-Note: \xff", "message", id="other-header"),
    ],
)
def test_from_message_header_bytes_that_are_not_utf8_are_rejected(
    policy: email.policy.Policy, header: str, field: str
) -> None:
    """Header bytes that are not UTF-8 (here Latin-1) are InvalidMail, not U+FFFD."""
    raw = b"To: a@example.com\r\n" + header.encode("latin-1") + b"\r\n\r\nhi\r\n"
    with pytest.raises(InvalidMail) as info:
        ok(from_raw(raw, policy))
    assert info.value.field == field


@pytest.mark.parametrize("policy", PARSE_POLICIES)
@pytest.mark.parametrize(
    ("header", "field"),
    [
        pytest.param("To: alice@example.com, bob@exam ple.com", "to", id="space-in-domain"),
        pytest.param("Cc: carol@example.com dave@example.com", "cc", id="missing-comma"),
        pytest.param("Cc: Carol <carol@example.com> junk", "cc", id="trailing-text"),
        pytest.param("Bcc: a@b@example.com", "bcc", id="two-at-signs"),
        pytest.param("From: Billing <billing@exam ple.com>", "sender", id="sender"),
        pytest.param("Reply-To: help@example.com help2@example.com", "reply_to", id="reply-to"),
    ],
)
def test_from_message_rejects_addresses_mail_would_reject(
    policy: email.policy.Policy, header: str, field: str
) -> None:
    """An address list the parser would have to rewrite or cut short is InvalidMail."""
    raw = f"To: first@example.com\r\n{header}\r\n\r\nhi\r\n".encode()
    with pytest.raises(InvalidMail) as info:
        ok(from_raw(raw, policy))
    assert info.value.field in (field, header.partition(":")[0].lower())


def test_from_message_accepts_a_group_and_obsolete_phrases() -> None:
    """An empty group and an unquoted dotted display name are valid address lists."""
    raw = b"To: undisclosed-recipients:;\r\nCc: J. Doe <j@example.com>\r\n\r\nhi\r\n"
    assert [r.address for r in ok(from_raw(raw)).recipients] == ['"J. Doe" <j@example.com>']


def injected_attachment() -> Message:
    outer = MIMEMultipart()
    outer["To"] = "a@example.com"
    outer.attach(MIMEText("see attachment"))
    attachment = MIMEApplication(b"%PDF-1.7")
    attachment.add_header("Content-Disposition", "attachment", filename="a.pdf\r\n\r\nINJECTED")
    outer.attach(attachment)
    return outer


def injected_header_name() -> Message:
    outer = EmailMessage()
    outer["To"] = "a@example.com"
    outer["X-A\r\nDisposition-Notification-To"] = "spy@evil.example"
    outer.set_content("hi")
    return outer


def injected_part_header_name() -> Message:
    outer = MIMEMultipart()
    outer["To"] = "a@example.com"
    part = MIMEText("hi")
    part["X-B\nBcc"] = "spy@evil.example"
    outer.attach(part)
    return outer


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(injected_attachment, id="part-header-value"),
        pytest.param(injected_header_name, id="header-name"),
        pytest.param(injected_part_header_name, id="part-header-name"),
    ],
)
def test_from_message_line_break_in_any_part_header_is_rejected(
    build: Callable[[], Message],
) -> None:
    """CR/LF in the name or value of any part's header is InvalidMail, not an injected header."""
    mail = Mail.from_message(build(), template_id="t", idempotency_key="k")
    with pytest.raises(InvalidMail) as info:
        ok(mail)
    assert info.value.field == "message"


@pytest.mark.parametrize("fold", ["\r\n ", "\r\n\t", "\n "])
def test_from_message_accepts_folded_headers(fold: str) -> None:
    """A compat32 message's folded headers (owned or not) are read unfolded, not refused."""
    raw = (
        f"To: a@example.com,{fold}b@example.com\r\n"
        f"Subject: a subject{fold}folded\r\n"
        f"List-Unsubscribe: <https://example.com/u/1>,{fold}<mailto:u@example.com>\r\n"
        "\r\nhi\r\n"
    ).encode()
    prepared = ok(from_raw(raw))
    assert [r.address for r in prepared.recipients] == ["a@example.com", "b@example.com"]
    assert prepared.payload.subject == "a subject folded"
    stored = email.message_from_bytes(prepared.payload.body, policy=email.policy.default)
    assert stored["List-Unsubscribe"].split() == [
        "<https://example.com/u/1>,",
        "<mailto:u@example.com>",
    ]


def multipart_without_boundary() -> Message:
    return email.message_from_bytes(
        "To: a@example.com\r\nContent-Type: multipart/mixed\r\n\r\nGrüße\r\n".encode()
    )


def non_ascii_str_payload() -> Message:
    msg = Message()
    msg["To"] = "a@example.com"
    msg.set_payload("Grüße")
    return msg


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(multipart_without_boundary, id="multipart-without-boundary"),
        pytest.param(non_ascii_str_payload, id="non-ascii-str-payload"),
    ],
)
def test_from_message_that_cannot_be_serialised_is_invalid_mail(
    build: Callable[[], Message],
) -> None:
    """A message the email package cannot write as bytes is InvalidMail, not UnicodeEncodeError."""
    mail = Mail.from_message(build(), template_id="t", idempotency_key="k")
    with pytest.raises(InvalidMail) as info:
        ok(mail)
    assert info.value.field == "message"
