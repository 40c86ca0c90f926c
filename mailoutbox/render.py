"""Stored parts -> RFC 5322 bytes, at send time.

Pure functions, no I/O. The outbox stores a mail's parts (payload, recipients)
rather than MIME, so Message-ID and Date are written here, per delivery:
the Message-ID is derived from the delivery id, hence the same on every retry
(receivers can de-duplicate an "unknown outcome" resend).

The bytes are assembled by hand instead of through ``EmailMessage`` with
``policy.default``, which is an order of magnitude slower; the pieces that need
care (RFC 2047 encoded-words, folding, transfer encodings) are small and are
checked by parsing the output back with the ``email`` package in the tests.

Output invariants: CRLF line endings, every line at most 998 octets (header
lines are folded at 78 where the text allows it), 7-bit clean (non-ASCII
text goes out as quoted-printable or base64, headers as encoded-words), Bcc
never written.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import functools
import io
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from email.errors import HeaderParseError
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.utils import format_datetime, getaddresses, parseaddr

from .errors import InvalidMail
from .records import Payload, Recipient
from .schema import Kind
from .transports.base import Envelope

__all__ = ["message_id_for", "render", "seven_bit_message", "seven_bit_parts"]

_CRLF = b"\r\n"
# RFC 5322 2.1.1: lines SHOULD stay within 78 characters and MUST within 998.
_FOLD_AT = 78
_MAX_LINE = 998
# A token longer than this cannot be folded into a legal line once a header name
# (at most 76 characters, see mail._HEADER_NAME) precedes it; such text is
# written as encoded-words instead, which can be split anywhere. (Unstructured
# values are allowed what their own header name leaves: see `_fits`.)
_MAX_TOKEN = 900
_B64_LINE = 76

# Printable ASCII without leading or trailing space: safe to write as-is.
_PLAIN_TEXT = re.compile(r"[!-~](?:[ -~]*[!-~])?")
# A display name made of RFC 5322 atoms separated by single spaces needs no quoting.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# Parses an unstructured header value as policy.default reads it (encoded-words decoded).
_UNSTRUCTURED: Callable[[str, str], object] = email.policy.default.header_factory
# What email.header and the policy.default parser take for the start of an encoded-word.
_ENCODED_WORD_START = re.compile(r"=\?[^?]*\?[bBqQ]\?")
# Split points for folding: a token is a run of non-spaces with the spaces before it,
# so folding before a token never leaves trailing whitespace on the line above. Trailing
# spaces belong to the last token: alone, they could not be folded onto a line of their
# own and would stretch the last line past 998 octets.
_TOKEN = re.compile(r" *[^ ]+(?: +$)?| +$")
# The bytes 7bit text may hold: printable ASCII, tab and LF (CR is normalised away).
# Deleting them (bytes.translate) leaves whatever rules 7bit out; a regex scan of a
# body cost more than the rest of its rendering.
_7BIT_TEXT_BYTES = bytes([9, 10, *range(0x20, 0x7F)])
_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# formataddr's output: `atoms <addr>`, `=?...?= <addr>` or `"quoted \\" name" <addr>`.
_NAME_ADDR = re.compile(
    r'(?:([^\s"\\()<>@,:;.\[\]]+(?: [^\s"\\()<>@,:;.\[\]]+)*)|"((?:[^"\\]|\\.)*)")'
    r' <([^\s"\\()<>@,:;\[\]]+@[^\s"\\()<>@,:;\[\]]+)>'
)
_QUOTED_PAIR = re.compile(r"\\(.)")
_FIELD_SPLIT = re.compile(rb"\r\n(?![ \t])")
_LINE_BREAK = re.compile("\r\n|\r|\n")

# Owned headers a stored message/rfc822 body must not carry (prepare() strips them;
# render filters again so that a Bcc can never leak, whatever is in the table).
_STRIPPED_FROM_BODY = frozenset(
    b"from to cc bcc subject reply-to message-id date sender mime-version".split()
)

# Encoded-word framing: "=?utf-8?b?" + base64 + "?=" within RFC 2047's 75 characters.
_EW_PREFIX = "=?utf-8?b?"
_EW_SUFFIX = "?="
_EW_MAX_BYTES = 45  # 60 base64 characters: a 72-character encoded-word


def message_id_for(delivery_id: uuid.UUID, sender: str, *, domain: str | None = None) -> str:
    """The Message-ID of a delivery, angle brackets included: ``<{delivery_id}@{domain}>``.

    `domain` defaults to the domain of `sender` (a stored address, display name
    allowed). The value depends only on its arguments, so every retry of a
    delivery carries the same Message-ID.
    """
    domain = check_message_id_domain(_sender_domain(sender) if domain is None else domain)
    return f"<{delivery_id}@{domain}>"


@functools.lru_cache(maxsize=256)
def _sender_domain(sender: str) -> str:
    return _split_address(sender)[1].rpartition("@")[2]


def render(
    delivery_id: uuid.UUID,
    payload: Payload,
    recipients: Sequence[Recipient],
    *,
    date: datetime | None = None,
    message_id_domain: str | None = None,
) -> Envelope:
    """Turn a delivery's stored parts into an Envelope with RFC 5322 bytes.

    Headers: From, To and Cc (recipients by kind, in the given order; Bcc
    recipients only go to the envelope), Subject, Date (`date`, default now,
    written in UTC; a naive `date` is taken as UTC), Message-ID (see
    `message_id_for`; `message_id_domain` overrides the sender's domain),
    MIME-Version, then the payload's extra headers in order. With no To or Cc
    recipient, ``To: undisclosed-recipients:;`` is written.

    Text line breaks are normalised to CRLF and a text part always ends with
    one. Envelope recipients are the bare addresses of to, cc and bcc,
    de-duplicated (domain compared case-insensitively) in order.

    Raises ValueError for an unknown content type and InvalidMail for a
    malformed `message_id_domain`.
    """
    sender_addr = _split_address(payload.sender)[1]
    message_id = message_id_for(delivery_id, payload.sender, domain=message_id_domain)

    to = [r.address for r in recipients if r.kind == Kind.TO]
    cc = [r.address for r in recipients if r.kind == Kind.CC]

    head: list[bytes] = [_from_header(payload.sender)]
    if to:
        head.append(_address_header("To", to))
    elif not cc:
        # RFC 5322 3.6.3: an empty group keeps bcc-only mail from looking malformed.
        head.append(b"To: undisclosed-recipients:;\r\n")
    if cc:
        head.append(_address_header("Cc", cc))
    if payload.subject is not None:
        head.append(_unstructured_header("Subject", payload.subject, plain_ok=_plain_subject))
    head.append(_date_header(datetime.now(timezone.utc) if date is None else date))
    head.append(b"Message-ID: " + message_id.encode("ascii") + _CRLF)
    head.append(b"MIME-Version: 1.0\r\n")
    for name, value in payload.headers:
        if name.lower() == "reply-to":
            head.append(_address_header(name, _reply_to_pairs(value)))
        else:
            head.append(_unstructured_header(name, value, plain_ok=_plain_value))

    head.extend(_content(payload, delivery_id))

    return Envelope(
        delivery_id=delivery_id,
        sender=sender_addr,
        recipients=_envelope_recipients(recipients),
        message=b"".join(head),
        message_id=message_id,
    )


# --- headers -------------------------------------------------------------------------------


def _as_utc(when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _date_header(when: datetime) -> bytes:
    return _date_header_at(_as_utc(when).replace(microsecond=0))


@functools.lru_cache(maxsize=8)
def _date_header_at(second: datetime) -> bytes:
    # A busy sender renders many mails within the same second (a claimed batch
    # shares one date: the claim's database time).
    return b"Date: " + format_datetime(second).encode("ascii") + _CRLF


@functools.lru_cache(maxsize=64)
def check_message_id_domain(domain: str) -> str:
    """`domain` if a Message-ID may carry it, else InvalidMail (the workers check theirs
    at start-up)."""
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        raise InvalidMail(f"malformed Message-ID domain {domain!r}", field="message_id_domain")
    return domain


@functools.lru_cache(maxsize=4096)
def _split_address(stored: str) -> tuple[str, str]:
    """(display name, addr-spec) of a stored address; the name decoded to Unicode."""
    if "<" not in stored:
        # normalize_address stores a bare addr-spec when there is no display name.
        return "", stored.strip()
    # email.utils.parseaddr is pure Python and the slowest step of a render; the forms
    # formataddr stores (see mail.normalize_address) are read directly, anything else
    # goes through parseaddr.
    match = _NAME_ADDR.fullmatch(stored)
    if match:
        plain, quoted, addr = match.groups()
        name = plain if quoted is None else _QUOTED_PAIR.sub(r"\1", quoted)
    else:
        name, addr = parseaddr(stored)
    return decode_encoded_words(name), addr


def decode_encoded_words(text: str) -> str:
    """`text` with its RFC 2047 encoded-words decoded; as given if it has none or is malformed.

    Validation uses it on names and subjects given encoded; render on stored display
    names, which hold an encoded-word only when the name itself contains "=?"
    (mail.stored_address), so that they are re-encoded and folded like any other.
    """
    if "=?" not in text:
        return text
    try:
        # policy.default's reading, as a reader's: compat32's make_header put a space
        # between an encoded-word and text right next to it ("Wörld !").
        decoded = str(_UNSTRUCTURED("subject", text))
    except (HeaderParseError, LookupError, UnicodeError, ValueError, IndexError):
        return text
    # Words it could not decode (a mislabelled charset) come out as U+FFFD: the text
    # as given says more than a replacement character.
    return text if "\ufffd" in decoded and "\ufffd" not in text else decoded


@functools.lru_cache(maxsize=1024)
def _reply_to_pairs(value: str) -> tuple[tuple[str, str], ...]:
    # Usually one value for all of a sender's mail, and getaddresses is slow.
    return tuple((decode_encoded_words(n), a) for n, a in getaddresses([value]) if a)


def envelope_address(stored: str) -> str:
    """The bare address a stored recipient gets the mail at (its envelope address)."""
    return _split_address(stored)[1]


def envelope_key(address: str) -> tuple[str, str]:
    """What makes two bare addresses the same mailbox: domains are case-insensitive,
    local parts are not."""
    local, _, domain = address.rpartition("@")
    return local, domain.lower()


def _envelope_recipients(recipients: Iterable[Recipient]) -> tuple[str, ...]:
    seen: set[tuple[str, str]] = set()
    out: list[str] = []
    for recipient in recipients:
        addr = _split_address(recipient.address)[1]
        key = envelope_key(addr)
        if key not in seen:
            seen.add(key)
            out.append(addr)
    return tuple(out)


def _encoded_words(text: str, first_bytes: int = _EW_MAX_BYTES) -> list[str]:
    """`text` as RFC 2047 "B" encoded-words of whole characters, each <= 72 chars.

    RFC 2047 decoders drop the whitespace between adjacent encoded-words, so a
    run of them reproduces `text` exactly, spaces included.
    """
    data = text.encode("utf-8")
    words: list[str] = []
    start, limit, size = 0, max(first_bytes, 6), len(data)
    while start < size:
        end = min(start + limit, size)
        if end < size:
            # Never split a UTF-8 sequence: back off to the start of the character.
            while data[end] & 0xC0 == 0x80:
                end -= 1
            # Prefer to split just after a space: decoders that wrongly keep the
            # whitespace between encoded-words (CPython's address parser before
            # gh-128110) then show a double space rather than a word cut in two.
            space = data.rfind(b" ", start + limit // 2, end)
            if space >= 0:
                end = space + 1
        words.append(_EW_PREFIX + base64.b64encode(data[start:end]).decode("ascii") + _EW_SUFFIX)
        start, limit = end, _EW_MAX_BYTES
    return words


def _word_tokens(words: list[str]) -> list[str]:
    return [words[0], *(" " + w for w in words[1:])] if words else []


def _fold(name: str, tokens: Iterable[str]) -> bytes:
    """Write ``name: value`` with value = "".join(tokens), folded before tokens.

    Every token but the first starts with whitespace, so a CRLF inserted before
    it is undone exactly by RFC 5322 unfolding. Whitespace-only tokens are never
    moved to a line of their own (such a line is not allowed).
    """
    lines: list[str] = []
    line = name + ":"
    content = False  # whether `line` holds anything but the name or indentation
    for i, token in enumerate(tokens):
        piece = " " + token if i == 0 else token
        if content and len(line) + len(piece) > _FOLD_AT and piece.strip(" "):
            lines.append(line)
            line = piece
        else:
            line += piece
        content = content or bool(piece.strip(" "))
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _fits(name: str, tokens: Sequence[str]) -> bool:
    """Whether `tokens`, folded after ``name:``, keep every line within 998 octets: the
    first shares its line with the name, any other may have a line of its own."""
    return len(tokens[0]) <= _MAX_LINE - len(name) - 2 and all(
        len(token) <= _MAX_LINE for token in tokens[1:]
    )


def folded_plain(name: str, value: str) -> str | None:
    """Printable ASCII `value` of header `name` folded before spaces (see `_fold`), as
    the value of a header line (CRLF-separated, without the name): None when a word
    of it is too long for any legal line."""
    tokens = _TOKEN.findall(value)
    if not tokens:
        return value
    if not _fits(name, tokens):
        return None
    return _fold(name, tokens).decode("ascii")[len(name) + 2 : -2]


def _plain_subject(value: str) -> bool:
    # "=?" could be read as the start of an encoded-word; encode instead.
    return bool(_PLAIN_TEXT.fullmatch(value)) and "=?" not in value


def _plain_value(value: str) -> bool:
    # Extra headers may be structured (List-Unsubscribe, ...): printable ASCII is
    # written untouched, unless a reader would decode part of it as an RFC 2047
    # encoded-word and so show different text.
    return not value or (
        value.isascii() and value.isprintable() and _ENCODED_WORD_START.search(value) is None
    )


def _unstructured_header(name: str, value: str, *, plain_ok: Callable[[str], bool]) -> bytes:
    if value == "":
        return name.encode("ascii") + b":\r\n"
    if plain_ok(value):
        if len(name) + len(value) + 2 <= _FOLD_AT:
            return f"{name}: {value}\r\n".encode("ascii")
        tokens = _TOKEN.findall(value)
        if _fits(name, tokens):
            return _fold(name, tokens)
    first = (_FOLD_AT - len(name) - 2 - len(_EW_PREFIX) - len(_EW_SUFFIX)) // 4 * 3
    return _fold(name, _word_tokens(_encoded_words(value, min(first, _EW_MAX_BYTES))))


@functools.lru_cache(maxsize=4096)
def _mailbox_tokens(name: str, addr: str) -> tuple[str, ...]:
    """Tokens of one mailbox (see `_fold`): the display name, then ``<addr>``."""
    angle = " <" + addr + ">"
    if not name:
        return (addr,)
    if "=?" not in name:
        if _ATOMS.fullmatch(name) and len(max(name.split(" "), key=len)) <= _MAX_TOKEN:
            return (*_word_tokens(name.split(" ")), angle)
        if name.isascii() and name.isprintable():
            # Inside a quoted string every space is content; folding keeps them all.
            quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
            tokens = _TOKEN.findall(quoted)
            if max(map(len, tokens)) <= _MAX_TOKEN:
                return (*tokens, angle)
    return (*_word_tokens(_phrase_words(name)), angle)


def _phrase_words(name: str) -> list[str]:
    """A display name as RFC 5322 words: plain atoms where possible, encoded-words else.

    Keeping ASCII atoms plain leaves fewer adjacent encoded-words, whose
    separating whitespace not every decoder handles (see `_encoded_words`).
    Names with leading, trailing or repeated spaces are encoded whole, since
    spaces between plain words are only a separator.
    """
    parts = name.split(" ")
    if "" in parts:
        return _encoded_words(name)
    words: list[str] = []
    run: list[str] = []
    for part in parts:
        if _ATOMS.fullmatch(part) and "=?" not in part and len(part) <= _MAX_TOKEN:
            if run:
                words.extend(_encoded_words(" ".join(run)))
                run.clear()
            words.append(part)
        else:
            run.append(part)
    if run:
        words.extend(_encoded_words(" ".join(run)))
    return words


@functools.lru_cache(maxsize=256)
def _from_header(sender: str) -> bytes:
    # A worker sends most of its mail from a handful of senders.
    return _address_header("From", [sender])


def _address_header(name: str, addresses: Sequence[str] | Sequence[tuple[str, str]]) -> bytes:
    tokens: list[str] = []
    for i, address in enumerate(addresses):
        pair = _split_address(address) if isinstance(address, str) else address
        mailbox = _mailbox_tokens(*pair)
        if i:
            tokens[-1] += ","
            tokens.append(" " + mailbox[0])
            tokens.extend(mailbox[1:])
        else:
            tokens.extend(mailbox)
    return _fold(name, tokens)


# --- bodies --------------------------------------------------------------------------------


def _content(payload: Payload, delivery_id: uuid.UUID) -> list[bytes]:
    """The Content-* headers, the blank line and the body."""
    kind = payload.content_type
    if kind == "text/plain" or kind == "text/html":
        cte, body = _encode_text(payload.body)
        return [
            f'Content-Type: {kind}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode("ascii"),
            body,
        ]
    if kind == "multipart/alternative":
        # Derived from the delivery so retries produce the same body. "=_" cannot occur
        # in quoted-printable or base64 output; a 7bit part that contains the boundary
        # is sent as quoted-printable instead.
        boundary = "=_" + delivery_id.hex
        marker = boundary.encode("ascii")
        out = [
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode("ascii")
        ]
        html = (payload.html_body or "").encode("utf-8")
        for subtype, data in (("plain", payload.body), ("html", html)):
            cte, body = _encode_text(data, forbid=marker)
            out.append(
                b"--"
                + marker
                + _CRLF
                + f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
                f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode("ascii")
                + body
                + _CRLF
            )
        out.append(b"--" + marker + b"--\r\n")
        return out
    if kind == "message/rfc822":
        return _embedded_message(payload.body)
    raise ValueError(f"unknown payload content type {kind!r}")


def _canonical_lines(data: bytes) -> bytes:
    """Text with LF line breaks (CR and CRLF folded into LF), ending in one unless empty."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data


def _encode_text(data: bytes, *, forbid: bytes | None = None) -> tuple[str, bytes]:
    """Choose a transfer encoding for text and apply it; CRLF line breaks in the result.

    7bit for ASCII without control characters and with lines of at most 998
    octets; else quoted-printable, unless base64 comes out shorter (mostly
    non-Latin text).
    """
    data = _canonical_lines(data)
    if (
        not data.translate(None, _7BIT_TEXT_BYTES)
        and (len(data) <= _MAX_LINE or max(map(len, data.split(b"\n"))) <= _MAX_LINE)
        and (forbid is None or forbid not in data)
    ):
        return "7bit", data.replace(b"\n", _CRLF)
    # b2a_qp keeps lines within 76 characters with soft breaks and encodes "=", trailing
    # whitespace and a lone "." on a line; its output has no bare CR, only LF breaks.
    qp = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    b64_size = (len(data) + 2) // 3 * 4 * (_B64_LINE + 2) // _B64_LINE
    if len(qp) <= b64_size:
        return "quoted-printable", qp.replace(b"\n", _CRLF)
    return "base64", _base64_lines(data.replace(b"\n", _CRLF))


def _base64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(encoded[i : i + _B64_LINE] + _CRLF for i in range(0, len(encoded), _B64_LINE))


def _is_clean(data: bytes) -> bool:
    """ASCII, CRLF only (no bare CR or LF), no NUL, and no line over 998 octets."""
    crlf = data.count(_CRLF)
    return (
        data.isascii()
        and b"\x00" not in data
        and data.count(b"\n") == crlf
        and data.count(b"\r") == crlf
        and max(map(len, data.split(_CRLF))) <= _MAX_LINE
    )


def _embedded_message(data: bytes) -> list[bytes]:
    """A stored message/rfc822 body (MIME headers + body) behind the outbox's headers.

    The caller's MIME structure is passed through byte for byte when it is
    already 7-bit clean with legal lines; otherwise it is re-encoded part by
    part (see `seven_bit_message`).
    """
    data = seven_bit_message(data)
    if data.startswith(_CRLF):
        head, body = b"", data[2:]
    else:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            head, body = data if data.endswith(_CRLF) else data + _CRLF, b""
        else:
            head, body = data[: end + 2], data[end + 4 :]
    fields = [
        f + _CRLF
        for f in _FIELD_SPLIT.split(head[:-2])
        if f and f.partition(b":")[0].strip().lower() not in _STRIPPED_FROM_BODY
    ]
    return [*fields, _CRLF, body]


def seven_bit_message(data: bytes) -> bytes:
    """Serialized MIME message `data` made 7-bit clean, with CRLF lines of <= 998 octets.

    Returned unchanged when it already is. Otherwise its parts are made clean
    as `seven_bit_parts` does and the message is generated again; raw 8-bit
    header text becomes RFC 2047 encoded-words. ``EmailMessage.set_content``
    under ``policy.default`` leaves non-ASCII text with short lines as 8bit,
    so prepare() makes a message clean once at enqueue, sparing every send
    the slow path.
    """
    if _is_clean(data):
        return data
    # refold_source="all": header lines are rewritten too, which RFC 2047-encodes raw
    # 8-bit header text a compat32 message may have carried.
    policy = email.policy.SMTP.clone(refold_source="all")
    message = BytesParser(policy=policy).parsebytes(data)
    seven_bit_parts(message)
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=policy).flatten(message)
    return out.getvalue()


def _is_clean_text(text: str) -> bool:
    return (
        text.isascii()
        and "\x00" not in text
        and max(map(len, _LINE_BREAK.split(text))) <= _MAX_LINE
    )


# Printable ASCII, tab and line breaks: a charset that writes these as ASCII bytes keeps
# line breaks as the bytes CR and LF, which _encode_text rewrites.
_ASCII_PROBE = "\t\r\n" + "".join(map(chr, range(0x20, 0x7F)))


@functools.lru_cache(maxsize=64)
def _ascii_compatible(charset: str) -> bool:
    try:
        return _ASCII_PROBE.encode(charset) == _ASCII_PROBE.encode("ascii")
    except (LookupError, ValueError):  # unknown to Python: its bytes are kept as they are
        return False


def seven_bit_parts(message: Message) -> None:
    """Make the parts of `message` 7-bit clean with lines of <= 998 octets, in place.

    Leaf parts whose encoded form is 8-bit, binary or has over-long lines are
    re-encoded: text in an ASCII-compatible charset as quoted-printable or
    base64 of its CRLF form, anything else (UTF-16 text too) as base64 of its
    bytes unchanged. A preamble or epilogue that is not clean is dropped: MIME
    readers ignore it anyway. Raises InvalidMail for a part the email package
    could not write: a multipart part without subparts (no boundary), or a
    payload of text where bytes belong (``set_payload`` without a charset).
    """
    for part in message.walk():
        if part.is_multipart():
            if part.preamble is not None and not _is_clean_text(part.preamble):
                part.preamble = None
            if part.epilogue is not None and not _is_clean_text(part.epilogue):
                part.epilogue = None
            continue
        # get_payload() decodes a payload of 8-bit bytes (held as surrogate escapes) with
        # errors="replace": only the stored value tells such bytes from text a caller set.
        payload = vars(part).get("_payload")
        if payload is None:
            continue
        if part.get_content_maintype() == "multipart":
            raise InvalidMail(
                "a multipart part has no subparts (is its boundary missing?)", field="message"
            )
        if not isinstance(payload, str):
            raise InvalidMail(
                f"a part's payload is a {type(payload).__name__}, not text", field="message"
            )
        cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if cte != "binary" and _is_clean_text(payload):
            continue
        try:
            payload.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            raise InvalidMail(
                "a part's payload is non-ASCII text, not bytes: set it with a charset",
                field="message",
            ) from None
        raw = part.get_payload(decode=True)
        assert isinstance(raw, bytes)
        if part.get_content_maintype() == "text" and _ascii_compatible(
            part.get_content_charset("us-ascii")
        ):
            cte, body = _encode_text(raw)
        else:
            cte, body = "base64", _base64_lines(raw)
        del part["Content-Transfer-Encoding"]
        part["Content-Transfer-Encoding"] = cte
        part.set_payload(body.decode("ascii"))
