"""`Mail`, what a caller enqueues, and its validation into storable parts.

Validation is pure and runs before any statement is built, so bad input never
reaches the database and never disturbs the caller's transaction. Addresses are
ASCII (domains in their punycode form); display names may be any Unicode.
"""

from __future__ import annotations

import copy
import email.policy
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.charset import Charset
from email.errors import MessageError, ObsoleteHeaderDefect
from email.header import Header
from email.headerregistry import BaseHeader, UnstructuredHeader
from email.message import EmailMessage, Message
from email.utils import formataddr, getaddresses, parseaddr
from typing import Any

from .errors import InvalidMail
from .records import Payload, Recipient
from .render import decode_encoded_words, folded_plain, seven_bit_message, seven_bit_parts
from .schema import Kind

DEFAULT_MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
MAX_KEY_LENGTH = 1000
MAX_HEADER_VALUE_LENGTH = 8000

# Headers the outbox writes itself at render time; a caller may not set them directly.
OWNED_HEADERS = frozenset(
    h.lower()
    for h in (
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
    )
)

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators: any of them in a header
# could split it (header injection) or be rewritten by a relay; lone surrogates cannot be
# encoded at all. The part beyond C0 is shared with _SOURCE_HEADER_FORBIDDEN.
_HEADER_FORBIDDEN_BEYOND_C0 = "\x7f-\x9f\u2028\u2029\u0085\ud800-\udfff"
_HEADER_FORBIDDEN = re.compile(f"[\x00-\x1f{_HEADER_FORBIDDEN_BEYOND_C0}]")
# Bodies may hold line breaks and tabs, but no NUL (PostgreSQL text cannot store it).
# Lone surrogates cannot be encoded as UTF-8 at all.
_BODY_FORBIDDEN = re.compile("[\x00\ud800-\udfff]")
_UTF8 = Charset("utf-8")
# Characters that force a display name into quotes (RFC 5322 specials and runs of spaces).
_NAME_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]|\s\s|^\s|\s$')
# What formataddr leaves unquoted but a reader collapses: runs of spaces, edge spaces.
_SPACE_RUNS = re.compile(r"\s\s|^\s|\s$")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext: printable ASCII but ':'
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_BARE_ADDRESS = re.compile(
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    rf"@{_LABEL}(?:\.{_LABEL})*"
)
_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _check_header_text(value: str, field_name: str) -> str:
    # Nearly every value is short printable ASCII; for ASCII text, isprintable() refuses
    # exactly the controls and DEL that _HEADER_FORBIDDEN matches, at C speed.
    if (
        type(value) is str
        and value.isascii()
        and value.isprintable()
        and len(value) <= MAX_HEADER_VALUE_LENGTH
    ):
        return value
    if not isinstance(value, str):
        raise InvalidMail(
            f"{field_name} must be a string, got {type(value).__name__}", field=field_name
        )
    if _HEADER_FORBIDDEN.search(value):
        raise InvalidMail(
            f"{field_name} contains a control character or line break", field=field_name
        )
    if len(value) > MAX_HEADER_VALUE_LENGTH:
        raise InvalidMail(
            f"{field_name} is longer than {MAX_HEADER_VALUE_LENGTH} characters", field=field_name
        )
    return value


def validate_addr_spec(address: str, field_name: str = "address") -> str:
    """Raise InvalidMail unless `address` is a plain ASCII local@domain address."""
    local, sep, domain = address.rpartition("@")
    labels = domain.split(".")
    if (
        not sep
        or len(address) > 254
        or len(local) > 64
        or not _LOCAL_PART.fullmatch(local)
        or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels)
    ):
        raise InvalidMail(f"{field_name}: malformed address {address!r}", field=field_name)
    return address


def stored_address(name: str, addr: str) -> str:
    """`name <addr>` as stored: like formataddr, but a non-ASCII name stays readable.

    formataddr would RFC 2047-encode it, which is what an operator then reads in
    the CLI; encoding belongs to render time. The one exception is a name that
    contains "=?": stored as written, render would read it as an RFC 2047
    encoded-word and send different text, so it is stored encoded.
    """
    if "=?" in name:
        return f"{_UTF8.header_encode(name)} <{addr}>"
    if name.isascii() and not _SPACE_RUNS.search(name):
        return formataddr((name, addr))
    if _NAME_SPECIALS.search(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{addr}>"


def normalize_address(value: str, field_name: str) -> str:
    """Validate `"addr@example.com"` or `"Name <addr@example.com>"` and return it normalised."""
    # Most addresses are a bare local@domain: that form is already normalised, and the
    # email.utils parsing below was half of enqueue's CPU.
    if not isinstance(value, str):
        _check_header_text(value, field_name)  # raises: it names the wrong type
    if len(value) <= 254:
        bare = _BARE_ADDRESS.fullmatch(value)
        if bare is not None and len(bare.group(1)) <= 64:
            return value
    return _normalize_address(str(value), field_name)


@functools.lru_cache(maxsize=1024)
def _normalize_address(value: str, field_name: str) -> str:
    _check_header_text(value, field_name)
    try:
        name, addr = parseaddr(value)
        count = len(getaddresses([value]))
    except RecursionError:
        # email._parseaddr recurses once per nested comment "((((...": a hostile value
        # must be InvalidMail, not an error that escapes validation.
        raise InvalidMail(f"{field_name}: malformed address {value!r}", field=field_name) from None
    # parseaddr is lenient: it drops spaces inside an addr-spec ("a@exam ple.com"), keeps
    # only the first of several addresses and ignores trailing junk. Insist that the
    # addr-spec it found is written verbatim, as the whole value or inside the final <...>.
    text = value.strip()
    written = text[text.rfind("<") + 1 : -1].strip() if text.endswith(">") else text
    if not addr or written != addr or count != 1:
        raise InvalidMail(f"{field_name}: malformed address {value!r}", field=field_name)
    # A name given as RFC 2047 encoded-words (formataddr's output) could hide a line break;
    # it is checked, and stored, decoded.
    name = decode_encoded_words(name)
    if _HEADER_FORBIDDEN.search(name):
        raise InvalidMail(
            f"{field_name} display name contains a control character or line break",
            field=field_name,
        )
    validate_addr_spec(addr, field_name)
    return stored_address(name, addr) if name else addr


def addr_spec(address: str) -> str:
    """The bare local@domain of a stored (normalised) address, for the SMTP envelope."""
    return parseaddr(address)[1]


def _address_list(value: str | Iterable[str] | None, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise InvalidMail(f"{field_name} must be a list of addresses", field=field_name) from None
    return tuple(normalize_address(item, field_name) for item in items)


def _has_forbidden_body_char(text: str) -> bool:
    # ASCII text holds no surrogate, and `in` scans for NUL far faster than the regex.
    if text.isascii():
        return "\x00" in text
    return _BODY_FORBIDDEN.search(text) is not None


def _check_key(value: object, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidMail(f"{field_name} must be a non-empty string", field=field_name)
    _check_header_text(value, field_name)
    # Counted in UTF-8 bytes: the pair shares one unique-index entry, which PostgreSQL
    # caps at 2,704 bytes; 1,000 characters of CJK text are 3,000 bytes and failed
    # in the database, aborting the caller's transaction.
    if len(value) > MAX_KEY_LENGTH or (
        not value.isascii() and len(value.encode("utf-8")) > MAX_KEY_LENGTH
    ):
        raise InvalidMail(
            f"{field_name} is longer than {MAX_KEY_LENGTH} bytes (UTF-8)", field=field_name
        )
    return value


def _check_when(value: object, field_name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidMail(f"{field_name} must be a datetime", field=field_name)
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidMail(f"{field_name} must be timezone-aware", field=field_name)
    # In UTC, because PostgreSQL cannot take every offset Python can (16 h and more,
    # fractions of a second), and a DataError would abort the caller's transaction.
    try:
        utc = value.astimezone(timezone.utc)
    except (OverflowError, ValueError) as exc:
        raise InvalidMail(f"{field_name} is out of range: {exc}", field=field_name) from exc
    # A time near year 1 or 9999 (datetime.max, meant as "never") is stored, but read
    # back in a session time zone east or west of UTC it is past what Python can hold:
    # every read of the row failed, and a claimed one stayed `sending` for good.
    if not _EARLIEST <= utc < _LATEST:
        raise InvalidMail(
            f"{field_name} must be between {_EARLIEST:%Y-%m-%d} and {_LATEST:%Y-%m-%d} UTC"
            " (None means no time at all)",
            field=field_name,
        )
    return utc


_EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(9000, 1, 1, tzinfo=timezone.utc)


# RFC 5322 folding as a parsed message holds it: a line break before whitespace. The
# whitespace is read as one space: a tab there is layout, and Mail refuses tabs in a subject.
_FOLDING = re.compile(r"\r?\n[ \t]")
# A fold that leaves a line of nothing but whitespace: RFC 5322 does not allow it, and a
# reader that trims lines could take it for the end of the header section.
_BLANK_CONTINUATION = re.compile(r"\n[ \t]*(?:\r?\n|\Z)")
# _HEADER_FORBIDDEN but for tabs: a caller's message may hold them inside a header value.
_SOURCE_HEADER_FORBIDDEN = re.compile(f"[\x00-\x08\x0a-\x1f{_HEADER_FORBIDDEN_BEYOND_C0}]")
# The Mail field each header of a caller's message fills.
_MESSAGE_FIELDS = {
    "from": "sender",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "subject": "subject",
}
# Parses address lists to the standard of Mail's own normalisation and reports what it had
# to skip or guess as defects, where email.utils.getaddresses silently rewrites.
_HEADER_FACTORY: Any = email.policy.default.header_factory


def _source_header(value: object, field_name: str) -> tuple[str, bool]:
    """A header value of a caller's message as one line of text, and whether it may still
    hold RFC 2047 encoded-words.

    Header objects (policy.default's, email.header.Header) give their decoded text.
    Anything else is the source as parsed: possibly folded, and with raw UTF-8 (RFC 6532)
    held as surrogate escapes, which compat32's get() would turn into U+FFFD. Bytes that
    are not UTF-8 are InvalidMail.
    """
    if isinstance(value, (BaseHeader, Header)):
        return str(value), False
    text = _FOLDING.sub(" ", str(value))
    if not text.isascii():
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeError:
            raise InvalidMail(
                f"{field_name} holds bytes that are not UTF-8", field=field_name
            ) from None
    return text, True


def _raw_values(message: Message, name: str) -> list[Any]:
    # raw_items(), not get_all(): the values as parsed, before a policy decodes them.
    key = name.lower()
    return [v for k, v in message.raw_items() if isinstance(k, str) and k.lower() == key]


def _message_addresses(message: Message, name: str) -> list[str]:
    """The mailboxes of header `name` of a caller's message, stored as Mail stores them.

    Raises InvalidMail where the header is not a clean address list (a space in a
    domain, a missing comma, trailing text), rather than keep what a lenient parser
    makes of it.
    """
    field_name = _MESSAGE_FIELDS[name.lower()]
    out: list[str] = []
    for value in _raw_values(message, name):
        text, _ = _source_header(value, field_name)
        if _SOURCE_HEADER_FORBIDDEN.search(text):
            raise InvalidMail(f"{name} contains a control character", field=field_name)
        if not text.strip():
            continue
        try:
            parsed = value if hasattr(value, "addresses") else _HEADER_FACTORY(name, text)
            defects = [d for d in parsed.defects if not isinstance(d, ObsoleteHeaderDefect)]
            mailboxes = list(parsed.addresses)
        except (RecursionError, MessageError, LookupError, ValueError):
            # RecursionError: deeply nested comments; see _normalize_address.
            raise InvalidMail(f"{name} is malformed", field=field_name) from None
        if defects:
            raise InvalidMail(
                f"{name}: malformed address list {text!r} ({defects[0]})", field=field_name
            )
        for mailbox in mailboxes:
            if _HEADER_FORBIDDEN.search(mailbox.display_name):
                raise InvalidMail(
                    f"{name} display name contains a control character", field=field_name
                )
            addr = validate_addr_spec(mailbox.addr_spec, field_name)
            out.append(stored_address(mailbox.display_name, addr))
    return out


@dataclass(frozen=True)
class Mail:
    """One e-mail to enqueue.

    `template_id` + `idempotency_key` identify it: enqueueing the same pair again
    returns the existing delivery. At least one of `text`/`html` is required
    (or a message, through `Mail.from_message`). `sender` falls back to the
    outbox's `default_sender`. `send_at` delays the first attempt; after
    `expires_at` the delivery is dead-lettered (reason ``expired``) instead of
    sent. Both must be timezone-aware.

    `headers` values are text, without the spaces at either end. Printable ASCII is
    written as given, so structured headers such as List-Unsubscribe keep their
    syntax; anything else, including ASCII a reader would decode as an RFC 2047
    encoded-word, is sent encoded so the recipient reads exactly the value given.
    """

    template_id: str
    idempotency_key: str
    to: Sequence[str] = ()
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()
    sender: str | None = None
    reply_to: Sequence[str] = ()
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = field(default_factory=dict)
    send_at: datetime | None = None
    expires_at: datetime | None = None
    # Set by from_message: the caller's MIME message (attachments and all).
    message: EmailMessage | None = None

    @classmethod
    def from_message(
        cls,
        message: Message,
        *,
        template_id: str,
        idempotency_key: str,
        send_at: datetime | None = None,
        expires_at: datetime | None = None,
    ) -> Mail:
        """Enqueue a ready `EmailMessage` (attachments, custom MIME structure).

        From/To/Cc/Bcc/Subject/Reply-To are read from the message's headers and
        stored like any Mail's; the outbox writes Message-ID and Date itself at
        send time. Bcc is used for the envelope only. A message parsed with the
        default compat32 policy works too: folded headers are unfolded and raw
        UTF-8 header text (RFC 6532) is read as UTF-8.

        Raises InvalidMail for an address header that is not a clean address
        list, or header bytes that are not UTF-8. prepare() then raises it for
        a header of any part whose name or unfolded value holds a line break or
        control character, and for a message the email package cannot write.
        """
        if not isinstance(message, Message):
            raise InvalidMail("from_message needs an email.message.Message", field="message")

        senders = _message_addresses(message, "From")
        if len(senders) > 1:
            # A mail has one sender here (the envelope's, and the From the outbox writes);
            # keeping the first would drop the other authors without a word.
            raise InvalidMail(
                f"the message's From holds {len(senders)} mailboxes; the outbox sends as one",
                field="sender",
            )
        subject_values = _raw_values(message, "Subject")
        subject: str | None = None
        if subject_values:
            text, encoded = _source_header(subject_values[0], "subject")
            subject = decode_encoded_words(text) if encoded else text
        return cls(
            template_id=template_id,
            idempotency_key=idempotency_key,
            to=_message_addresses(message, "To"),
            cc=_message_addresses(message, "Cc"),
            bcc=_message_addresses(message, "Bcc"),
            reply_to=_message_addresses(message, "Reply-To"),
            sender=senders[0] if senders else None,
            subject=subject,
            send_at=send_at,
            expires_at=expires_at,
            message=copy.deepcopy(message),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class PreparedMail:
    """A validated Mail split into the rows enqueue writes."""

    template_id: str
    idempotency_key: str
    payload: Payload
    recipients: tuple[Recipient, ...]
    send_at: datetime | None
    expires_at: datetime | None


def _extra_headers(headers: object) -> list[tuple[str, str]]:
    pairs: list[Any]
    if isinstance(headers, Mapping):
        pairs = list(headers.items())
    else:
        try:
            pairs = [
                # "ab" would be taken for the pair ("a", "b").
                p if isinstance(p, (str, bytes)) else tuple(p)
                for p in headers  # type: ignore[attr-defined]
            ]
        except TypeError:
            raise InvalidMail(
                "headers must be a mapping or a list of pairs", field="headers"
            ) from None
    out: list[tuple[str, str]] = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise InvalidMail("headers must be (name, value) pairs", field="headers")
        name, value = pair
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidMail(f"malformed header name {name!r}", field="headers")
        if name.lower() in OWNED_HEADERS:
            raise InvalidMail(
                f"header {name!r} is set by the outbox; use the Mail field instead", field="headers"
            )
        # Edge spaces mean nothing to a reader (leading ones are dropped), and trailing
        # ones at the end of a header line change under a relay that trims lines,
        # which breaks a DKIM signature with simple header canonicalisation.
        out.append((name, _check_header_text(value, f"header {name}").strip(" ")))
    return out


_STRIPPED_FROM_MESSAGE = OWNED_HEADERS - {
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}


# How the caller's message is written: header values exactly as _check_part_headers
# leaves them (it folds each one itself or makes it a header object that folds itself).
_MESSAGE_POLICY = email.policy.SMTP.clone(refold_source="none")


def _check_part_headers(part: Message) -> None:
    """Raise InvalidMail for a header of `part` that could end its line early or hide another.

    Values are checked unfolded, as a reader sees them. A raw 8-bit value (or an
    email.header.Header, which policy.SMTP cannot fold) is stored again as a
    policy.default header object, so that it is written as RFC 2047 encoded-words.
    A printable ASCII value of an unstructured header is folded before its spaces
    and written as given: the email package folds such values at 78 characters and
    encodes any word it cannot fit, which turned a long Message-ID in References or
    In-Reply-To, a URL in List-Unsubscribe or a Content-ID into encoded-words that
    no reader takes for one (threads, one-click unsubscribe and inline images
    broke). Only a word too long for any header line is still encoded. Any other
    source value with a line over 78 characters is refolded by its header object,
    as policy.SMTP would.
    """
    items = list(part.raw_items())
    rewritten = False
    for i, (name, value) in enumerate(items):
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidMail(f"the message has a malformed header name {name!r}", field="message")
        text, source = _source_header(value, "message")
        if _SOURCE_HEADER_FORBIDDEN.search(text) or (
            isinstance(value, str) and _BLANK_CONTINUATION.search(value)
        ):
            raise InvalidMail(
                f"header {name} of the message contains a control character or line break",
                field="message",
            )
        if len(text) > MAX_HEADER_VALUE_LENGTH:
            raise InvalidMail(
                f"header {name} of the message is longer than {MAX_HEADER_VALUE_LENGTH} characters",
                field="message",
            )
        plain = (
            folded_plain(name, text)
            if text.isascii()
            and "=?" not in text
            and issubclass(_HEADER_FACTORY[name], UnstructuredHeader)
            else None
        )
        if plain is not None:
            items[i] = (name, plain)
        elif (
            isinstance(value, Header)
            or (source and not text.isascii())
            or (isinstance(value, str) and max(map(len, value.splitlines() or [""])) > 78)
        ):
            items[i] = (name, _HEADER_FACTORY(name, text))
        else:
            continue
        rewritten = True
    if rewritten:
        for name in {n.lower() for n, _ in items}:
            del part[name]
        for name, value in items:
            part.set_raw(name, value)


def _message_body(message: Message) -> bytes:
    """The caller's message, owned headers removed, as the 7-bit MIME bytes that are stored.

    Raises InvalidMail for a header that could inject another, and for a message
    the email package cannot write as bytes.
    """
    try:
        stripped = copy.deepcopy(message)
        for name in list(stripped.keys()):
            if isinstance(name, str) and name.lower() in _STRIPPED_FROM_MESSAGE:
                del stripped[name]
        for part in stripped.walk():
            _check_part_headers(part)
        # Before generating: the generator rewrites line breaks inside 8-bit payloads
        # byte by byte, which breaks UTF-16 text, and cannot write some of them at all.
        seven_bit_parts(stripped)
        data = stripped.as_bytes(policy=_MESSAGE_POLICY)
        # Stored 7-bit clean (set_content leaves short non-ASCII text as 8bit), so render
        # passes it through as is instead of re-encoding it on every send.
        return seven_bit_message(data)
    except InvalidMail:
        raise
    except (
        AttributeError,
        LookupError,
        MessageError,
        RecursionError,
        TypeError,
        ValueError,
    ) as exc:
        raise InvalidMail(f"the message cannot be written as MIME: {exc}", field="message") from exc


def prepare(
    mail: Mail,
    *,
    default_sender: str | None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> PreparedMail:
    """Validate `mail` and split it into payload and recipients; raise InvalidMail if bad."""
    if not isinstance(mail, Mail):
        raise InvalidMail(f"expected a Mail, got {type(mail).__name__}")
    template_id = _check_key(mail.template_id, "template_id")
    idempotency_key = _check_key(mail.idempotency_key, "idempotency_key")

    recipients = (
        *(Recipient(address, Kind.TO) for address in _address_list(mail.to, "to")),
        *(Recipient(address, Kind.CC) for address in _address_list(mail.cc, "cc")),
        *(Recipient(address, Kind.BCC) for address in _address_list(mail.bcc, "bcc")),
    )
    if not recipients:
        raise InvalidMail("a mail needs at least one recipient (to, cc or bcc)", field="to")
    if len(recipients) > 1000:
        raise InvalidMail("a mail may have at most 1000 recipients", field="to")

    sender_value = mail.sender if mail.sender is not None else default_sender
    if sender_value is None:
        raise InvalidMail(
            "no sender: set Mail.sender or the outbox's default_sender", field="sender"
        )
    sender = normalize_address(sender_value, "sender")

    subject = None if mail.subject is None else _check_header_text(mail.subject, "subject")
    headers = _extra_headers(mail.headers)
    reply_to = _address_list(mail.reply_to, "reply_to")
    if reply_to:
        headers.insert(0, ("Reply-To", ", ".join(reply_to)))

    for name in ("text", "html"):
        value = getattr(mail, name)
        if value is not None:
            if not isinstance(value, str):
                raise InvalidMail(f"{name} must be a string", field=name)
            if _has_forbidden_body_char(value):
                raise InvalidMail(f"{name} contains a NUL or a lone surrogate", field=name)

    html_body: str | None = None
    if mail.message is not None:
        if mail.text is not None or mail.html is not None:
            raise InvalidMail("a mail from a message takes no text or html", field="message")
        content_type, body = "message/rfc822", _message_body(mail.message)
    elif mail.text is not None and mail.html is not None:
        content_type, body, html_body = "multipart/alternative", mail.text.encode(), mail.html
    elif mail.text is not None:
        content_type, body = "text/plain", mail.text.encode()
    elif mail.html is not None:
        content_type, body = "text/html", mail.html.encode()
    else:
        raise InvalidMail("a mail needs text, html, or both", field="text")

    size = (
        len(body)
        + len((html_body or "").encode())
        + len((subject or "").encode())
        + sum(len(n) + len(v.encode()) for n, v in headers)
    )
    if size > max_payload_bytes:
        raise InvalidMail(
            f"payload is {size} bytes, over the limit of {max_payload_bytes}", field="body"
        )

    send_at = _check_when(mail.send_at, "send_at")
    expires_at = _check_when(mail.expires_at, "expires_at")
    if send_at is not None and expires_at is not None and expires_at <= send_at:
        raise InvalidMail("expires_at must be after send_at", field="expires_at")

    return PreparedMail(
        template_id=template_id,
        idempotency_key=idempotency_key,
        payload=Payload(content_type, subject, body, html_body, sender, tuple(headers)),
        recipients=recipients,
        send_at=send_at,
        expires_at=expires_at,
    )
