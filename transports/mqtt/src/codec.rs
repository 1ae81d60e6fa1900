//! MQTT 3.1.1 and MQTT 5 packets behind one version-neutral type, so the session layer never touches
//! a codec type. We run our own session layer instead of embedding a broker because a broker
//! acknowledges a QoS 1 PUBLISH as soon as it holds the message, while thingraft may only send the
//! PUBACK once the message is committed in the Raft log: the session has to own the moment each PUBACK
//! goes out. The codec under it is `mqttbytes` 0.6, the same codec rumqttd later vendored as
//! `rumqttd::protocol`; we use it directly to avoid rumqttd's broker dependency stack.
//!
//! What a device sees must match ThingsBoard, whose MQTT transport runs on Netty's `MqttDecoder` and
//! `MqttEncoder`. Where mqttbytes falls short of that, this module does the work itself:
//!
//! - Framing is ours, so an oversized packet is rejected as soon as its fixed header arrives and a
//!   client can't make us buffer it first.
//! - CONNECT is parsed by hand. mqttbytes rejects MQTT 3.1 (`MQIsdp`, level 3), reads the password as
//!   UTF-8 text, and can't tell an absent username or password from an empty one. Netty accepts
//!   MQTT 3.1, reads the password as bytes, and decodes CONNECT strings leniently.
//! - PUBACK, UNSUBSCRIBE, PINGREQ and DISCONNECT are parsed by hand. mqttbytes' MQTT 5 UNSUBSCRIBE
//!   reader prints to stderr (`dbg!`), and its MQTT 5 reader rejects the 2-byte DISCONNECT
//!   (`0xE0 0x00`) that means "normal disconnection".
//! - Server-to-client packets are written by hand. Each is a few bytes, and `mqttbytes` can't
//!   express every reason code ThingsBoard sends. The unit tests check the bytes against mqttbytes'
//!   own writer wherever it can express the packet, and check that mqttbytes' and rumqttc's client
//!   decoders accept every packet.
//!
//! Checks copied from Netty: QoS bits `11` in any fixed header, SUBSCRIBE, UNSUBSCRIBE and PUBREL
//! without QoS 1 flags, a wildcard in a PUBLISH topic, packet identifier 0, a CONNECT reserved flag
//! (3.1.1/5), and bytes left over after a packet's fields. Each of these is a decoding failure, which
//! ThingsBoard answers by closing the connection. Like ThingsBoard, [`read`] skips packets that have
//! no [`Incoming`] variant (PUBREC, PUBREL, PUBCOMP, MQTT 5 AUTH, and the server-to-client types).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqttbytes::FixedHeader;

/// The protocol version of a connection, fixed by its CONNECT. MQTT 3.1 (`MQIsdp`) counts as
/// [`Version::V3_1_1`]: it has the same packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V3_1_1,
    V5,
}

/// What a client may send, already decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Connect(Connect),
    /// `qos` is 0, 1 or 2; `pkid` is 0 for QoS 0. On MQTT 5, a PUBLISH that names its topic only by
    /// a Topic Alias arrives with an empty `topic` (topic aliases aren't supported).
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    PubAck {
        pkid: u16,
    },
    /// One entry per filter: the filter and its requested QoS (0, 1 or 2).
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
}

/// A decoded CONNECT. `username` and `password` are `None` when their flag is clear, so an absent
/// field can be told from an empty one. Like Netty, invalid UTF-8 in the client id, username or
/// password is replaced with U+FFFD rather than rejected. The password is binary in MQTT, and
/// ThingsBoard reads it as `new String(bytes, UTF_8)`. The will message and all MQTT 5 properties
/// are skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive_s: u16,
    pub clean_session: bool,
}

/// Why [`read`] refused the bytes. After any error, close the connection: the state of the
/// buffer is unspecified.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The bytes aren't a valid packet (Netty's decoder fails on these too).
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// The whole packet (fixed header included) would be `size` bytes, more than `max`. This is
    /// detected from the fixed header alone.
    #[error("packet of {size} bytes exceeds the limit of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },
    /// CONNECT with protocol name `MQTT` or `MQIsdp` but a level other than 4/5 (`MQTT`) or 3
    /// (`MQIsdp`). Per the spec, a server may answer with CONNACK
    /// [`ConnackCode::UnsupportedProtocolVersion`] in 3.1.1 framing, then close.
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// CONNECT with a protocol name other than `MQTT` or `MQIsdp`.
    #[error("unsupported protocol name {name:?} (level {level})")]
    UnsupportedProtocolName { name: String, level: u8 },
    /// The first packet of a connection wasn't CONNECT (detected from its first byte).
    #[error("first packet must be CONNECT")]
    FirstPacketNotConnect,
    /// MQTT 3.1 only: the client id must be 1 to 23 characters (Netty rejects other lengths with
    /// `MqttIdentifierRejectedException`). Carries the length in characters.
    #[error("MQTT 3.1 client identifier must be 1 to 23 characters, got {0}")]
    ClientIdRejected(usize),
}

impl CodecError {
    /// The MQTT 5 DISCONNECT reason that fits this error, for sessions that tell the client why
    /// before closing.
    pub fn disconnect_code(&self) -> DisconnectCode {
        match self {
            CodecError::PacketTooLarge { .. } => DisconnectCode::PacketTooLarge,
            CodecError::FirstPacketNotConnect => DisconnectCode::ProtocolError,
            CodecError::Malformed(_)
            | CodecError::UnsupportedProtocolLevel(_)
            | CodecError::UnsupportedProtocolName { .. }
            | CodecError::ClientIdRejected(_) => DisconnectCode::MalformedPacket,
        }
    }
}

/// CONNACK reason, version-neutral; [`write_connack`] maps it per version (ThingsBoard's
/// `ReturnCodeResolver`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnackCode {
    Accepted,
    BadUserNamePassword,
    ClientIdNotValid,
    NotAuthorized,
    ServerUnavailable,
    ConnectionRateExceeded,
    UnsupportedProtocolVersion,
}

impl ConnackCode {
    /// The byte on the wire: the 3.1.1 return code or the MQTT 5 reason code.
    pub const fn code(self, version: Version) -> u8 {
        match version {
            Version::V3_1_1 => match self {
                ConnackCode::Accepted => 0,
                ConnackCode::UnsupportedProtocolVersion => 1,
                ConnackCode::ClientIdNotValid => 2,
                ConnackCode::ServerUnavailable | ConnackCode::ConnectionRateExceeded => 3,
                // ThingsBoard answers bad credentials with "not authorized" (5), not with 4.
                ConnackCode::BadUserNamePassword | ConnackCode::NotAuthorized => 5,
            },
            Version::V5 => match self {
                ConnackCode::Accepted => 0x00,
                ConnackCode::UnsupportedProtocolVersion => 0x84,
                ConnackCode::ClientIdNotValid => 0x85,
                ConnackCode::BadUserNamePassword => 0x86,
                ConnackCode::NotAuthorized => 0x87,
                ConnackCode::ServerUnavailable => 0x88,
                ConnackCode::ConnectionRateExceeded => 0x9F,
            },
        }
    }
}

/// PUBACK reason (MQTT 5 only; 3.1.1 PUBACK has no code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PubAckCode {
    Success,
    TopicNameInvalid,
    PayloadFormatInvalid,
    ImplementationSpecificError,
    NotAuthorized,
    QuotaExceeded,
    PacketTooLarge,
}

impl PubAckCode {
    /// The MQTT 5 reason code.
    pub const fn reason_code(self) -> u8 {
        match self {
            PubAckCode::Success => 0x00,
            PubAckCode::ImplementationSpecificError => 0x83,
            PubAckCode::NotAuthorized => 0x87,
            PubAckCode::TopicNameInvalid => 0x90,
            PubAckCode::PacketTooLarge => 0x95,
            PubAckCode::QuotaExceeded => 0x97,
            PubAckCode::PayloadFormatInvalid => 0x99,
        }
    }
}

/// DISCONNECT reason sent by the server (MQTT 5 only; on 3.1.1 the server just closes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectCode {
    ImplementationSpecificError,
    SessionTakenOver,
    MessageRateTooHigh,
    QuotaExceeded,
    AdministrativeAction,
    PacketTooLarge,
    MalformedPacket,
    ProtocolError,
    KeepAliveTimeout,
    PayloadFormatInvalid,
}

impl DisconnectCode {
    /// The MQTT 5 reason code.
    pub const fn reason_code(self) -> u8 {
        match self {
            DisconnectCode::MalformedPacket => 0x81,
            DisconnectCode::ProtocolError => 0x82,
            DisconnectCode::ImplementationSpecificError => 0x83,
            DisconnectCode::KeepAliveTimeout => 0x8D,
            DisconnectCode::SessionTakenOver => 0x8E,
            DisconnectCode::PacketTooLarge => 0x95,
            DisconnectCode::MessageRateTooHigh => 0x96,
            DisconnectCode::QuotaExceeded => 0x97,
            DisconnectCode::AdministrativeAction => 0x98,
            DisconnectCode::PayloadFormatInvalid => 0x99,
        }
    }
}

// Packet types (high nibble of the first byte).
const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREL: u8 = 6;
const SUBSCRIBE: u8 = 8;
const UNSUBSCRIBE: u8 = 10;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// The largest value a 4-byte variable byte integer can hold.
const MAX_REMAINING_LENGTH: usize = 268_435_455;
/// MQTT 3.1 client ids: 1 to this many characters (Netty's default `maxClientIdLength`).
const MQTT31_MAX_CLIENT_ID_CHARS: usize = 23;
/// SUBACK return code for a refused filter: 3.1.1 "Failure", MQTT 5 "Topic Filter invalid".
const SUBACK_FAILURE_V3: u8 = 0x80;
const SUBACK_FAILURE_V5: u8 = 0x8F;

/// Reads one packet from `buf` (consuming its bytes) if a whole one is there: `Ok(None)` if more
/// bytes are needed, with `buf` left as it was (it may get spare capacity for the rest of the packet).
///
/// Before CONNECT (`version == None`) only a CONNECT is accepted, and its protocol level picks the
/// version for the rest of the connection (`MQTT`/4 and `MQIsdp`/3 give [`Version::V3_1_1`],
/// `MQTT`/5 gives [`Version::V5`]). A CONNECT that arrives later is decoded the same way and returned:
/// what to do with a second CONNECT is up to the session. `max_packet_bytes` bounds the whole packet,
/// fixed header included. A larger packet is an error as soon as its fixed header arrives, so it is
/// never buffered.
///
/// Packets a client has no business sending, and the QoS 2 handshake (PUBREC, PUBREL, PUBCOMP,
/// MQTT 5 AUTH, CONNACK, SUBACK, UNSUBACK, PINGRESP), are consumed and skipped, as ThingsBoard
/// does. A session that tracks keep-alive by packet should count bytes read, not calls to `read`
/// that return something.
pub fn read(
    buf: &mut BytesMut,
    version: Option<Version>,
    max_packet_bytes: usize,
) -> Result<Option<Incoming>, CodecError> {
    loop {
        let Some(&byte1) = buf.first() else {
            return Ok(None);
        };
        check_first_byte(byte1, version)?;
        let Some(header) = parse_fixed_header(buf)? else {
            return Ok(None);
        };
        let size = header.frame_len();
        if size > max_packet_bytes {
            return Err(CodecError::PacketTooLarge {
                size,
                max: max_packet_bytes,
            });
        }
        if buf.len() < size {
            buf.reserve(size - buf.len());
            return Ok(None);
        }
        let frame = buf.split_to(size).freeze();
        if let Some(packet) = decode(&header, frame, version)? {
            return Ok(Some(packet));
        }
    }
}

/// Writes a CONNACK. On MQTT 5 the property length is 0 (no properties), as Netty writes it.
pub fn write_connack(buf: &mut BytesMut, version: Version, code: ConnackCode, session_present: bool) {
    buf.put_u8(0x20);
    match version {
        Version::V3_1_1 => buf.put_u8(2),
        Version::V5 => buf.put_u8(3),
    }
    buf.put_u8(u8::from(session_present));
    buf.put_u8(code.code(version));
    if version == Version::V5 {
        buf.put_u8(0);
    }
}

/// Writes a PUBACK. On 3.1.1 it is always `40 02 pkid`: a 3.1.1 PUBACK can't carry a code, so a
/// failure code still writes a plain PUBACK (as ThingsBoard does). On MQTT 5, `Success` uses the
/// same short form; any other code is written as `40 04 pkid code 00` (the empty property length
/// included), the same bytes Netty and rumqttc write.
pub fn write_puback(buf: &mut BytesMut, version: Version, pkid: u16, code: PubAckCode) {
    buf.put_u8(0x40);
    if version == Version::V3_1_1 || code == PubAckCode::Success {
        buf.put_u8(2);
        buf.put_u16(pkid);
    } else {
        buf.put_u8(4);
        buf.put_u16(pkid);
        buf.put_u8(code.reason_code());
        buf.put_u8(0);
    }
}

/// One entry per filter: `Ok(granted qos)` or `Err(())` for a refused filter (3.1.1: 0x80;
/// 5: 0x8F Topic Filter invalid). A granted QoS above 2 is a caller bug: it is logged and written
/// as a refusal.
pub fn write_suback(buf: &mut BytesMut, version: Version, pkid: u16, results: &[Result<u8, ()>]) {
    let (failure, properties) = match version {
        Version::V3_1_1 => (SUBACK_FAILURE_V3, 0),
        Version::V5 => (SUBACK_FAILURE_V5, 1),
    };
    buf.put_u8(0x90);
    put_remaining_length(buf, 2 + properties + results.len());
    buf.put_u16(pkid);
    if properties == 1 {
        buf.put_u8(0);
    }
    for result in results {
        let code = match *result {
            Ok(qos) if qos <= 2 => qos,
            Ok(qos) => {
                tracing::error!(
                    qos,
                    pkid,
                    "SUBACK granted an invalid QoS; writing a refusal instead"
                );
                failure
            }
            Err(()) => failure,
        };
        buf.put_u8(code);
    }
}

/// Writes an UNSUBACK. On MQTT 5 it has one reason code per filter, all 0x00 (Success).
pub fn write_unsuback(buf: &mut BytesMut, version: Version, pkid: u16, n_filters: usize) {
    buf.put_u8(0xB0);
    match version {
        Version::V3_1_1 => {
            buf.put_u8(2);
            buf.put_u16(pkid);
        }
        Version::V5 => {
            put_remaining_length(buf, 3 + n_filters);
            buf.put_u16(pkid);
            buf.put_u8(0);
            buf.put_bytes(0, n_filters);
        }
    }
}

/// Writes a PUBLISH with DUP and RETAIN clear (and, on MQTT 5, no properties). Returns without
/// writing anything, and logs an error, if the caller passes something no packet can carry: QoS
/// above 2, packet id 0 with QoS above 0, a topic over 65535 bytes, or a packet over the 256 MiB
/// protocol limit.
pub fn write_publish(buf: &mut BytesMut, version: Version, topic: &str, qos: u8, pkid: u16, payload: &[u8]) {
    let properties = usize::from(version == Version::V5);
    let packet_id = if qos > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + packet_id + properties + payload.len();
    let Ok(topic_len) = u16::try_from(topic.len()) else {
        tracing::error!(topic_len = topic.len(), "PUBLISH topic is too long; not written");
        return;
    };
    if qos > 2 || (qos > 0 && pkid == 0) || remaining > MAX_REMAINING_LENGTH {
        tracing::error!(qos, pkid, remaining, "PUBLISH cannot be encoded; not written");
        return;
    }
    buf.reserve(5 + remaining);
    buf.put_u8(0x30 | (qos << 1));
    put_remaining_length(buf, remaining);
    buf.put_u16(topic_len);
    buf.put_slice(topic.as_bytes());
    if qos > 0 {
        buf.put_u16(pkid);
    }
    if properties == 1 {
        buf.put_u8(0);
    }
    buf.put_slice(payload);
}

/// Writes a PINGRESP (the same two bytes in both versions).
pub fn write_pingresp(buf: &mut BytesMut, _version: Version) {
    buf.put_slice(&[0xD0, 0x00]);
}

/// Writes a DISCONNECT, on MQTT 5 as `E0 02 code 00` (the same bytes Netty writes). Writes nothing for
/// 3.1.1, where the server just closes the connection.
pub fn write_disconnect(buf: &mut BytesMut, version: Version, code: DisconnectCode) {
    if version == Version::V5 {
        buf.put_slice(&[0xE0, 0x02, code.reason_code(), 0x00]);
    }
}

/// Writes `len` as a variable byte integer. Callers keep `len` within [`MAX_REMAINING_LENGTH`].
fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        // `len % 128` always fits in a byte.
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// A parsed fixed header.
struct Header {
    byte1: u8,
    /// Bytes taken by the remaining length (1 to 4).
    len_len: usize,
    remaining: usize,
}

impl Header {
    fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }

    fn frame_len(&self) -> usize {
        1 + self.len_len + self.remaining
    }

    fn body_start(&self) -> usize {
        1 + self.len_len
    }

    fn mqttbytes(&self) -> FixedHeader {
        FixedHeader::new(self.byte1, self.len_len, self.remaining)
    }
}

/// Checks what the first byte alone can tell, so a bad stream is refused before it is buffered.
fn check_first_byte(byte1: u8, version: Option<Version>) -> Result<(), CodecError> {
    let packet_type = byte1 >> 4;
    let qos_bits = (byte1 >> 1) & 0b11;
    if version.is_none() && packet_type != CONNECT {
        return Err(CodecError::FirstPacketNotConnect);
    }
    if packet_type == 0 {
        return Err(malformed("fixed header", "reserved packet type 0"));
    }
    if qos_bits == 3 {
        return Err(malformed("fixed header", "QoS bits 11"));
    }
    if matches!(packet_type, PUBREL | SUBSCRIBE | UNSUBSCRIBE) && qos_bits != 1 {
        return Err(malformed(
            "fixed header",
            "PUBREL, SUBSCRIBE and UNSUBSCRIBE need flags 0010",
        ));
    }
    if packet_type == AUTH && version != Some(Version::V5) {
        return Err(malformed("fixed header", "AUTH needs MQTT 5"));
    }
    Ok(())
}

/// Parses the fixed header at the start of `buf`: `Ok(None)` if its remaining length isn't complete.
fn parse_fixed_header(buf: &[u8]) -> Result<Option<Header>, CodecError> {
    let Some((&byte1, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let mut remaining = 0;
    for (i, &byte) in rest.iter().take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some(Header {
                byte1,
                len_len: i + 1,
                remaining,
            }));
        }
    }
    if rest.len() >= 4 {
        return Err(malformed("fixed header", "remaining length longer than 4 bytes"));
    }
    Ok(None)
}

/// Decodes one whole frame: `Ok(None)` for a packet that is skipped.
fn decode(header: &Header, frame: Bytes, version: Option<Version>) -> Result<Option<Incoming>, CodecError> {
    let body = frame.slice(header.body_start()..);
    if header.packet_type() == CONNECT {
        return decode_connect(body).map(|connect| Some(Incoming::Connect(connect)));
    }
    // `check_first_byte` refused every other packet type before CONNECT.
    let version = version.unwrap_or(Version::V3_1_1);
    let packet = match header.packet_type() {
        PUBLISH => decode_publish(header, frame, version)?,
        PUBACK => decode_puback(body, version)?,
        SUBSCRIBE => decode_subscribe(header, frame, version)?,
        UNSUBSCRIBE => decode_unsubscribe(body, version)?,
        PINGREQ => {
            expect_end(&body, "PINGREQ")?;
            Incoming::PingReq
        }
        DISCONNECT => decode_disconnect(body, version)?,
        packet_type => {
            tracing::debug!(packet_type, "skipping a packet the server ignores");
            return Ok(None);
        }
    };
    Ok(Some(packet))
}

fn decode_connect(mut body: Bytes) -> Result<Connect, CodecError> {
    const P: &str = "CONNECT";
    let name = read_binary(&mut body, P)?;
    let level = read_u8(&mut body, P)?;
    let (version, mqtt31) = match (&name[..], level) {
        (b"MQTT", 4) => (Version::V3_1_1, false),
        (b"MQTT", 5) => (Version::V5, false),
        (b"MQIsdp", 3) => (Version::V3_1_1, true),
        (b"MQTT" | b"MQIsdp", level) => return Err(CodecError::UnsupportedProtocolLevel(level)),
        (name, level) => {
            let name = String::from_utf8_lossy(name).into_owned();
            return Err(CodecError::UnsupportedProtocolName { name, level });
        }
    };
    let flags = read_u8(&mut body, P)?;
    if !mqtt31 && flags & 0x01 != 0 {
        return Err(malformed(P, "reserved flag set"));
    }
    let keep_alive_s = read_u16(&mut body, P)?;
    if version == Version::V5 {
        skip_properties(&mut body, P)?;
    }
    let client_id = read_lossy(&mut body, P)?;
    if mqtt31 {
        let chars = client_id.chars().count();
        if chars == 0 || chars > MQTT31_MAX_CLIENT_ID_CHARS {
            return Err(CodecError::ClientIdRejected(chars));
        }
    }
    if flags & 0x04 != 0 {
        if version == Version::V5 {
            skip_properties(&mut body, P)?;
        }
        read_binary(&mut body, P)?; // will topic
        read_binary(&mut body, P)?; // will message
    }
    let username = if flags & 0x80 != 0 {
        Some(read_lossy(&mut body, P)?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(read_lossy(&mut body, P)?)
    } else {
        None
    };
    expect_end(&body, P)?;
    Ok(Connect {
        version,
        client_id,
        username,
        password,
        keep_alive_s,
        clean_session: flags & 0x02 != 0,
    })
}

fn decode_publish(header: &Header, frame: Bytes, version: Version) -> Result<Incoming, CodecError> {
    const P: &str = "PUBLISH";
    let fixed = header.mqttbytes();
    let (topic, qos, pkid, payload) = match version {
        Version::V3_1_1 => {
            let p = mqttbytes::v4::Publish::read(fixed, frame).map_err(|e| from_mqttbytes(P, e))?;
            (p.topic, p.qos as u8, p.pkid, p.payload)
        }
        Version::V5 => {
            let p = mqttbytes::v5::Publish::read(fixed, frame).map_err(|e| from_mqttbytes(P, e))?;
            (p.topic, p.qos as u8, p.pkid, p.payload)
        }
    };
    if topic.contains(['+', '#']) {
        return Err(malformed(P, "wildcard in topic name"));
    }
    Ok(Incoming::Publish {
        topic,
        qos,
        pkid,
        payload,
    })
}

fn decode_puback(mut body: Bytes, version: Version) -> Result<Incoming, CodecError> {
    const P: &str = "PUBACK";
    let pkid = read_pkid(&mut body, P)?;
    if version == Version::V5 && body.has_remaining() {
        read_u8(&mut body, P)?; // reason code
        if body.has_remaining() {
            skip_properties(&mut body, P)?;
        }
    }
    expect_end(&body, P)?;
    Ok(Incoming::PubAck { pkid })
}

fn decode_subscribe(header: &Header, frame: Bytes, version: Version) -> Result<Incoming, CodecError> {
    const P: &str = "SUBSCRIBE";
    let fixed = header.mqttbytes();
    let (pkid, filters) = match version {
        Version::V3_1_1 => {
            let s = mqttbytes::v4::Subscribe::read(fixed, frame).map_err(|e| from_mqttbytes(P, e))?;
            (
                s.pkid,
                s.filters.into_iter().map(|f| (f.path, f.qos as u8)).collect(),
            )
        }
        Version::V5 => {
            let s = mqttbytes::v5::Subscribe::read(fixed, frame).map_err(|e| from_mqttbytes(P, e))?;
            (
                s.pkid,
                s.filters.into_iter().map(|f| (f.path, f.qos as u8)).collect(),
            )
        }
    };
    if pkid == 0 {
        return Err(malformed(P, "packet identifier 0"));
    }
    Ok(Incoming::Subscribe { pkid, filters })
}

fn decode_unsubscribe(mut body: Bytes, version: Version) -> Result<Incoming, CodecError> {
    const P: &str = "UNSUBSCRIBE";
    let pkid = read_pkid(&mut body, P)?;
    if version == Version::V5 {
        skip_properties(&mut body, P)?;
    }
    let mut filters = Vec::new();
    while body.has_remaining() {
        filters.push(read_utf8(&mut body, P)?);
    }
    Ok(Incoming::Unsubscribe { pkid, filters })
}

fn decode_disconnect(mut body: Bytes, version: Version) -> Result<Incoming, CodecError> {
    const P: &str = "DISCONNECT";
    if version == Version::V5 && body.has_remaining() {
        read_u8(&mut body, P)?; // reason code
        if body.has_remaining() {
            skip_properties(&mut body, P)?;
        }
    }
    expect_end(&body, P)?;
    Ok(Incoming::Disconnect)
}

fn malformed(packet: &str, reason: impl std::fmt::Display) -> CodecError {
    CodecError::Malformed(format!("{packet}: {reason}"))
}

fn from_mqttbytes(packet: &str, error: mqttbytes::Error) -> CodecError {
    malformed(packet, format_args!("{error:?}"))
}

fn expect_end(body: &Bytes, packet: &str) -> Result<(), CodecError> {
    if body.has_remaining() {
        return Err(malformed(
            packet,
            format_args!("{} unexpected trailing bytes", body.remaining()),
        ));
    }
    Ok(())
}

fn read_u8(body: &mut Bytes, packet: &str) -> Result<u8, CodecError> {
    if body.remaining() < 1 {
        return Err(malformed(packet, "truncated"));
    }
    Ok(body.get_u8())
}

fn read_u16(body: &mut Bytes, packet: &str) -> Result<u16, CodecError> {
    if body.remaining() < 2 {
        return Err(malformed(packet, "truncated"));
    }
    Ok(body.get_u16())
}

fn read_pkid(body: &mut Bytes, packet: &str) -> Result<u16, CodecError> {
    match read_u16(body, packet)? {
        0 => Err(malformed(packet, "packet identifier 0")),
        pkid => Ok(pkid),
    }
}

/// Reads a two-byte-length-prefixed field.
fn read_binary(body: &mut Bytes, packet: &str) -> Result<Bytes, CodecError> {
    let len = usize::from(read_u16(body, packet)?);
    if body.remaining() < len {
        return Err(malformed(packet, "field longer than the packet"));
    }
    Ok(body.split_to(len))
}

fn read_utf8(body: &mut Bytes, packet: &str) -> Result<String, CodecError> {
    String::from_utf8(read_binary(body, packet)?.to_vec()).map_err(|_| malformed(packet, "invalid UTF-8"))
}

/// Reads a string field the way Netty does, replacing invalid UTF-8 instead of failing.
fn read_lossy(body: &mut Bytes, packet: &str) -> Result<String, CodecError> {
    Ok(String::from_utf8_lossy(&read_binary(body, packet)?).into_owned())
}

/// Skips an MQTT 5 property block (variable byte integer length, then the properties).
fn skip_properties(body: &mut Bytes, packet: &str) -> Result<(), CodecError> {
    let mut len = 0;
    let mut done = false;
    for i in 0..4 {
        let byte = read_u8(body, packet)?;
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            done = true;
            break;
        }
    }
    if !done {
        return Err(malformed(packet, "property length longer than 4 bytes"));
    }
    if body.remaining() < len {
        return Err(malformed(packet, "properties longer than the packet"));
    }
    body.advance(len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 65536;

    fn read_one(bytes: &[u8], version: Option<Version>) -> Result<Option<Incoming>, CodecError> {
        let mut buf = BytesMut::from(bytes);
        let packet = read(&mut buf, version, MAX);
        if matches!(packet, Ok(Some(_))) {
            assert!(buf.is_empty(), "packet not fully consumed: {buf:?}");
        }
        packet
    }

    fn connect(
        version: Version,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Incoming {
        Incoming::Connect(Connect {
            version,
            client_id: client_id.into(),
            username: username.map(Into::into),
            password: password.map(Into::into),
            keep_alive_s: 60,
            clean_session: true,
        })
    }

    fn bytes_of(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut buf = BytesMut::new();
        write(&mut buf);
        buf.to_vec()
    }

    // ---- CONNECT ----

    #[test]
    fn connect_v311_from_mqttbytes_encoder() {
        let mut c = mqttbytes::v4::Connect::new("dev-1");
        c.keep_alive = 60;
        c.set_login("token", "secret");
        let mut buf = BytesMut::new();
        c.write(&mut buf).unwrap();
        let expected = connect(Version::V3_1_1, "dev-1", Some("token"), Some("secret"));
        assert_eq!(read_one(&buf, None).unwrap(), Some(expected));
    }

    #[test]
    fn connect_v311_from_rumqttc_with_empty_client_id_and_username_only() {
        use rumqttc::mqttbytes::v4::{Connect as RConnect, Login, Packet};
        let mut c = RConnect::new("");
        c.keep_alive = 60;
        c.login = Some(Login::new("access-token", ""));
        let mut buf = BytesMut::new();
        Packet::Connect(c).write(&mut buf, MAX).unwrap();
        let expected = connect(Version::V3_1_1, "", Some("access-token"), None);
        assert_eq!(read_one(&buf, None).unwrap(), Some(expected));
    }

    #[test]
    fn connect_v5_from_rumqttc_with_properties_will_and_login() {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{
            Connect as RConnect, ConnectProperties, LastWill, LastWillProperties, Login, Packet,
        };
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(3600);
        props.receive_maximum = Some(10);
        props.user_properties = vec![("k".into(), "v".into())];
        let will_props = LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        };
        let will = LastWill::new(
            "v1/devices/me/will",
            "bye",
            QoS::AtLeastOnce,
            false,
            Some(will_props),
        );
        let c = RConnect {
            keep_alive: 60,
            client_id: "dev-5".into(),
            clean_start: true,
            properties: Some(props),
        };
        let mut buf = BytesMut::new();
        Packet::Connect(c, Some(will), Some(Login::new("user", "pass")))
            .write(&mut buf, None)
            .unwrap();
        let expected = connect(Version::V5, "dev-5", Some("user"), Some("pass"));
        assert_eq!(read_one(&buf, None).unwrap(), Some(expected));
    }

    #[test]
    fn connect_v5_from_mqttbytes_with_empty_client_id() {
        let mut c = mqttbytes::v5::Connect::new("");
        c.keep_alive = 60;
        c.set_login("u", "p");
        let mut buf = BytesMut::new();
        c.write(&mut buf).unwrap();
        let expected = connect(Version::V5, "", Some("u"), Some("p"));
        assert_eq!(read_one(&buf, None).unwrap(), Some(expected));
    }

    /// Builds a CONNECT frame by hand: name, level, flags, keep-alive 60, then `rest`.
    fn raw_connect(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, flags, 0, 60]);
        body.extend_from_slice(rest);
        let mut frame = BytesMut::new();
        frame.put_u8(0x10);
        put_remaining_length(&mut frame, body.len());
        frame.extend_from_slice(&body);
        frame.to_vec()
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn connect_mqtt31_decodes_as_v311() {
        let rest = [string(b"dev31"), string(b"tok"), string(b"pw")].concat();
        let frame = raw_connect(b"MQIsdp", 3, 0xC2, &rest);
        let expected = connect(Version::V3_1_1, "dev31", Some("tok"), Some("pw"));
        assert_eq!(read_one(&frame, None).unwrap(), Some(expected));
    }

    #[test]
    fn connect_mqtt31_client_id_length_is_checked_like_netty() {
        let frame = raw_connect(b"MQIsdp", 3, 0x02, &string(&[b'a'; 24]));
        assert_eq!(read_one(&frame, None), Err(CodecError::ClientIdRejected(24)));
        let frame = raw_connect(b"MQIsdp", 3, 0x02, &string(b""));
        assert_eq!(read_one(&frame, None), Err(CodecError::ClientIdRejected(0)));
    }

    #[test]
    fn connect_unsupported_protocols() {
        let id = string(b"d");
        assert_eq!(
            read_one(&raw_connect(b"MQTT", 6, 0x02, &id), None),
            Err(CodecError::UnsupportedProtocolLevel(6))
        );
        assert_eq!(
            read_one(&raw_connect(b"MQTT", 3, 0x02, &id), None),
            Err(CodecError::UnsupportedProtocolLevel(3))
        );
        assert_eq!(
            read_one(&raw_connect(b"MQIsdp", 4, 0x02, &id), None),
            Err(CodecError::UnsupportedProtocolLevel(4))
        );
        assert_eq!(
            read_one(&raw_connect(b"HTTP", 4, 0x02, &id), None),
            Err(CodecError::UnsupportedProtocolName {
                name: "HTTP".into(),
                level: 4
            })
        );
    }

    #[test]
    fn connect_reserved_flag_and_trailing_bytes_are_malformed() {
        let id = string(b"d");
        let frame = raw_connect(b"MQTT", 4, 0x03, &id);
        assert!(matches!(read_one(&frame, None), Err(CodecError::Malformed(_))));
        let frame = raw_connect(b"MQTT", 4, 0x02, &[id.clone(), vec![0xAA]].concat());
        assert!(matches!(read_one(&frame, None), Err(CodecError::Malformed(_))));
        // Username flag set but the field is missing.
        let frame = raw_connect(b"MQTT", 4, 0x82, &id);
        assert!(matches!(read_one(&frame, None), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn connect_binary_password_is_read_lossily_like_netty() {
        let rest = [string(b"d"), string(b"u"), string(&[0xFF, b'x'])].concat();
        let frame = raw_connect(b"MQTT", 4, 0xC2, &rest);
        let Ok(Some(Incoming::Connect(c))) = read_one(&frame, None) else {
            panic!("CONNECT expected");
        };
        assert_eq!(c.password.as_deref(), Some("\u{FFFD}x"));
    }

    #[test]
    fn first_packet_not_connect_is_refused_from_its_first_byte() {
        assert_eq!(
            read_one(&[0xC0, 0x00], None),
            Err(CodecError::FirstPacketNotConnect)
        );
        // A lone first byte is enough.
        assert_eq!(read_one(&[0x30], None), Err(CodecError::FirstPacketNotConnect));
    }

    // ---- framing ----

    #[test]
    fn partial_buffer_returns_none_and_keeps_the_bytes() {
        let mut full = BytesMut::new();
        write_publish(
            &mut full,
            Version::V3_1_1,
            "v1/devices/me/telemetry",
            1,
            7,
            &[b'x'; 300],
        );
        let mut buf = BytesMut::new();
        for (i, byte) in full.iter().enumerate() {
            assert_eq!(
                read(&mut buf, Some(Version::V3_1_1), MAX).unwrap(),
                None,
                "at byte {i}"
            );
            assert_eq!(buf.len(), i, "bytes must be kept");
            buf.put_u8(*byte);
        }
        let packet = read(&mut buf, Some(Version::V3_1_1), MAX).unwrap();
        assert!(matches!(packet, Some(Incoming::Publish { pkid: 7, qos: 1, .. })));
        assert!(buf.is_empty());
    }

    #[test]
    fn two_packets_in_one_buffer_decode_one_at_a_time() {
        let mut buf = BytesMut::new();
        let mut c = mqttbytes::v4::Connect::new("d");
        c.keep_alive = 60;
        c.write(&mut buf).unwrap();
        buf.put_slice(&[0xC0, 0x00]);
        let first = read(&mut buf, None, MAX).unwrap();
        assert_eq!(first, Some(connect(Version::V3_1_1, "d", None, None)));
        assert_eq!(buf.as_ref(), &[0xC0, 0x00]);
        assert_eq!(
            read(&mut buf, Some(Version::V3_1_1), MAX).unwrap(),
            Some(Incoming::PingReq)
        );
        assert_eq!(read(&mut buf, Some(Version::V3_1_1), MAX).unwrap(), None);
    }

    #[test]
    fn oversized_publish_is_refused_from_its_fixed_header() {
        // Only the fixed header of a 100 000-byte PUBLISH has arrived.
        let mut header = BytesMut::new();
        header.put_u8(0x30);
        put_remaining_length(&mut header, 100_000);
        let mut buf = header.clone();
        assert_eq!(
            read(&mut buf, Some(Version::V3_1_1), MAX),
            Err(CodecError::PacketTooLarge {
                size: 100_004,
                max: MAX
            })
        );
        // The bound is on the whole packet: 65 536 bytes in all passes, one more doesn't.
        for (total, ok) in [(MAX, true), (MAX + 1, false)] {
            let payload = vec![0u8; total - 4 - 2 - 1];
            let mut buf = BytesMut::new();
            write_publish(&mut buf, Version::V3_1_1, "t", 0, 0, &payload);
            assert_eq!(buf.len(), total);
            assert_eq!(
                read(&mut buf, Some(Version::V3_1_1), MAX).is_ok(),
                ok,
                "{total} bytes"
            );
        }
    }

    #[test]
    fn garbage_is_an_error() {
        // Remaining length with a fifth continuation byte.
        let bytes = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert!(matches!(
            read_one(&bytes, Some(Version::V3_1_1)),
            Err(CodecError::Malformed(_))
        ));
        // Reserved packet type 0, QoS bits 11, SUBSCRIBE with flags 0000.
        for bytes in [[0x00, 0x00], [0x36, 0x00], [0x80, 0x00]] {
            assert!(matches!(
                read_one(&bytes, Some(Version::V5)),
                Err(CodecError::Malformed(_))
            ));
        }
        // A CONNECT whose body is noise.
        let bytes = [0x10, 0x04, 0xDE, 0xAD, 0xBE, 0xEF];
        assert!(matches!(read_one(&bytes, None), Err(CodecError::Malformed(_))));
        // PINGREQ and 3.1.1 DISCONNECT with a body.
        assert!(matches!(
            read_one(&[0xC0, 0x01, 0x00], Some(Version::V5)),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            read_one(&[0xE0, 0x01, 0x00], Some(Version::V3_1_1)),
            Err(CodecError::Malformed(_))
        ));
        // AUTH on 3.1.1.
        assert!(matches!(
            read_one(&[0xF0, 0x00], Some(Version::V3_1_1)),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias towards plausible headers so the packet decoders get exercised too.
            if let Some(first) = bytes.first_mut() {
                *first = (*first & 0xF0) | [0x00, 0x02, 0x00, 0x02][round % 4];
            }
            if let Some(second) = bytes.get_mut(1) {
                *second = u8::try_from(len.saturating_sub(2)).unwrap_or(0) & 0x7F;
            }
            for version in [None, Some(Version::V3_1_1), Some(Version::V5)] {
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(_)) = read(&mut buf, version, 128) {}
            }
        }
    }

    // ---- other client packets ----

    #[test]
    fn client_packets_v311_from_rumqttc() {
        use rumqttc::mqttbytes::QoS;
        use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe, SubscribeFilter, Unsubscribe};
        let v = Some(Version::V3_1_1);
        let encode = |p: Packet| {
            let mut buf = BytesMut::new();
            p.write(&mut buf, MAX).unwrap();
            buf
        };
        let mut publish = Publish::new("v1/devices/me/telemetry", QoS::AtLeastOnce, "{\"t\":1}");
        publish.pkid = 42;
        assert_eq!(
            read_one(&encode(Packet::Publish(publish)), v).unwrap(),
            Some(Incoming::Publish {
                topic: "v1/devices/me/telemetry".into(),
                qos: 1,
                pkid: 42,
                payload: Bytes::from_static(b"{\"t\":1}"),
            })
        );
        let publish = Publish::new("a/b", QoS::AtMostOnce, "x");
        assert!(matches!(
            read_one(&encode(Packet::Publish(publish)), v).unwrap(),
            Some(Incoming::Publish { qos: 0, pkid: 0, .. })
        ));
        assert_eq!(
            read_one(&encode(Packet::PubAck(PubAck::new(9))), v).unwrap(),
            Some(Incoming::PubAck { pkid: 9 })
        );
        let mut subscribe = Subscribe::new_many([
            SubscribeFilter::new("v1/devices/me/attributes".into(), QoS::AtLeastOnce),
            SubscribeFilter::new("v1/devices/me/rpc/request/+".into(), QoS::AtMostOnce),
        ]);
        subscribe.pkid = 3;
        assert_eq!(
            read_one(&encode(Packet::Subscribe(subscribe)), v).unwrap(),
            Some(Incoming::Subscribe {
                pkid: 3,
                filters: vec![
                    ("v1/devices/me/attributes".into(), 1),
                    ("v1/devices/me/rpc/request/+".into(), 0),
                ],
            })
        );
        let mut unsubscribe = Unsubscribe::new("v1/devices/me/attributes");
        unsubscribe.pkid = 4;
        assert_eq!(
            read_one(&encode(Packet::Unsubscribe(unsubscribe)), v).unwrap(),
            Some(Incoming::Unsubscribe {
                pkid: 4,
                filters: vec!["v1/devices/me/attributes".into()]
            })
        );
        assert_eq!(
            read_one(&encode(Packet::PingReq), v).unwrap(),
            Some(Incoming::PingReq)
        );
        assert_eq!(
            read_one(&encode(Packet::Disconnect), v).unwrap(),
            Some(Incoming::Disconnect)
        );
    }

    #[test]
    fn client_packets_v5_from_rumqttc() {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{
            Disconnect, DisconnectProperties, DisconnectReasonCode, Filter, Packet, PingReq, PubAck,
            PubAckReason, Publish, PublishProperties, Subscribe, Unsubscribe, UnsubscribeProperties,
        };
        let v = Some(Version::V5);
        let encode = |p: Packet| {
            let mut buf = BytesMut::new();
            p.write(&mut buf, None).unwrap();
            buf
        };
        let props = PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            user_properties: vec![("a".into(), "b".into())],
            ..Default::default()
        };
        let mut publish = Publish::new("v1/devices/me/telemetry", QoS::AtLeastOnce, "{}", Some(props));
        publish.pkid = 5;
        assert_eq!(
            read_one(&encode(Packet::Publish(publish)), v).unwrap(),
            Some(Incoming::Publish {
                topic: "v1/devices/me/telemetry".into(),
                qos: 1,
                pkid: 5,
                payload: Bytes::from_static(b"{}"),
            })
        );
        for reason in [PubAckReason::Success, PubAckReason::NoMatchingSubscribers] {
            let mut puback = PubAck::new(11, None);
            puback.reason = reason;
            assert_eq!(
                read_one(&encode(Packet::PubAck(puback)), v).unwrap(),
                Some(Incoming::PubAck { pkid: 11 })
            );
        }
        let mut subscribe = Subscribe::new_many(
            [
                Filter::new("v1/devices/me/attributes", QoS::AtLeastOnce),
                Filter::new("a/#", QoS::ExactlyOnce),
            ],
            None,
        );
        subscribe.pkid = 6;
        assert_eq!(
            read_one(&encode(Packet::Subscribe(subscribe)), v).unwrap(),
            Some(Incoming::Subscribe {
                pkid: 6,
                filters: vec![("v1/devices/me/attributes".into(), 1), ("a/#".into(), 2)],
            })
        );
        let props = UnsubscribeProperties {
            user_properties: vec![("k".into(), "v".into())],
        };
        let mut unsubscribe = Unsubscribe::new("a/#", Some(props));
        unsubscribe.filters.push("b".into());
        unsubscribe.pkid = 8;
        assert_eq!(
            read_one(&encode(Packet::Unsubscribe(unsubscribe)), v).unwrap(),
            Some(Incoming::Unsubscribe {
                pkid: 8,
                filters: vec!["a/#".into(), "b".into()]
            })
        );
        assert_eq!(
            read_one(&encode(Packet::PingReq(PingReq)), v).unwrap(),
            Some(Incoming::PingReq)
        );
        let mut disconnect = Disconnect::new(DisconnectReasonCode::DisconnectWithWillMessage);
        disconnect.properties = Some(DisconnectProperties {
            session_expiry_interval: Some(0),
            reason_string: Some("bye".into()),
            user_properties: vec![],
            server_reference: None,
        });
        assert_eq!(
            read_one(&encode(Packet::Disconnect(disconnect)), v).unwrap(),
            Some(Incoming::Disconnect)
        );
        // Reason code without properties, with and without the property length. (rumqttc 0.25 writes
        // this case as `E0 01 04 00`, one byte past its remaining length, so it is built by hand.)
        for bytes in [&[0xE0, 0x01, 0x04][..], &[0xE0, 0x02, 0x04, 0x00]] {
            assert_eq!(read_one(bytes, v).unwrap(), Some(Incoming::Disconnect));
        }
        // The short "normal disconnection" form, which mqttbytes' own v5 reader rejects.
        assert_eq!(read_one(&[0xE0, 0x00], v).unwrap(), Some(Incoming::Disconnect));
    }

    #[test]
    fn netty_rules_on_client_packets() {
        let v = Some(Version::V3_1_1);
        // PUBLISH to a wildcard topic.
        let mut buf = BytesMut::new();
        write_publish(&mut buf, Version::V3_1_1, "a/+", 0, 0, b"x");
        assert!(matches!(read_one(&buf, v), Err(CodecError::Malformed(_))));
        // SUBSCRIBE, UNSUBSCRIBE and PUBACK with packet id 0.
        for bytes in [
            &[0x82, 0x06, 0, 0, 0, 1, b'a', 0][..],
            &[0xA2, 0x05, 0, 0, 0, 1, b'a'],
            &[0x40, 0x02, 0, 0],
        ] {
            assert!(
                matches!(read_one(bytes, v), Err(CodecError::Malformed(_))),
                "{bytes:?}"
            );
        }
        // A 3.1.1 PUBACK with a reason code byte.
        assert!(matches!(
            read_one(&[0x40, 0x03, 0, 1, 0], v),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn ignored_packets_are_skipped() {
        let v = Some(Version::V5);
        // PUBREC, PUBREL, PUBCOMP, AUTH, then PINGREQ.
        let bytes = [
            0x50, 0x02, 0, 1, 0x62, 0x02, 0, 1, 0x70, 0x02, 0, 1, 0xF0, 0x00, 0xC0, 0x00,
        ];
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(read(&mut buf, v, MAX).unwrap(), Some(Incoming::PingReq));
        assert!(buf.is_empty());
        // Only skipped packets: nothing to return, all consumed.
        let mut buf = BytesMut::from(&bytes[..4]);
        assert_eq!(read(&mut buf, v, MAX).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_later_connect_is_returned_to_the_session() {
        let mut buf = BytesMut::new();
        mqttbytes::v5::Connect::new("again").write(&mut buf).unwrap();
        assert!(matches!(
            read(&mut buf, Some(Version::V3_1_1), MAX).unwrap(),
            Some(Incoming::Connect(Connect {
                version: Version::V5,
                ..
            }))
        ));
    }

    // ---- CONNACK ----

    const ALL_CONNACK: [ConnackCode; 7] = [
        ConnackCode::Accepted,
        ConnackCode::BadUserNamePassword,
        ConnackCode::ClientIdNotValid,
        ConnackCode::NotAuthorized,
        ConnackCode::ServerUnavailable,
        ConnackCode::ConnectionRateExceeded,
        ConnackCode::UnsupportedProtocolVersion,
    ];

    #[test]
    fn connack_bytes_v311() {
        let expected = [0, 5, 2, 5, 3, 3, 1];
        for (code, rc) in ALL_CONNACK.into_iter().zip(expected) {
            let bytes = bytes_of(|b| write_connack(b, Version::V3_1_1, code, false));
            assert_eq!(bytes, [0x20, 0x02, 0x00, rc], "{code:?}");
        }
        let bytes = bytes_of(|b| write_connack(b, Version::V3_1_1, ConnackCode::Accepted, true));
        assert_eq!(bytes, [0x20, 0x02, 0x01, 0x00]);
    }

    #[test]
    fn connack_bytes_v5() {
        let expected = [0x00, 0x86, 0x85, 0x87, 0x88, 0x9F, 0x84];
        for (code, rc) in ALL_CONNACK.into_iter().zip(expected) {
            let bytes = bytes_of(|b| write_connack(b, Version::V5, code, false));
            assert_eq!(bytes, [0x20, 0x03, 0x00, rc, 0x00], "{code:?}");
        }
        let bytes = bytes_of(|b| write_connack(b, Version::V5, ConnackCode::Accepted, true));
        assert_eq!(bytes, [0x20, 0x03, 0x01, 0x00, 0x00]);
    }

    #[test]
    fn connack_is_accepted_by_client_decoders() {
        use rumqttc::mqttbytes::v4::{ConnectReturnCode as R4, Packet as P4};
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as R5, Packet as P5};
        let v3 = [
            R4::Success,
            R4::NotAuthorized,
            R4::BadClientId,
            R4::NotAuthorized,
            R4::ServiceUnavailable,
            R4::ServiceUnavailable,
            R4::RefusedProtocolVersion,
        ];
        let v5 = [
            R5::Success,
            R5::BadUserNamePassword,
            R5::ClientIdentifierNotValid,
            R5::NotAuthorized,
            R5::ServerUnavailable,
            R5::ConnectionRateExceeded,
            R5::UnsupportedProtocolVersion,
        ];
        for ((code, r4), r5) in ALL_CONNACK.into_iter().zip(v3).zip(v5) {
            let mut buf = BytesMut::new();
            write_connack(&mut buf, Version::V3_1_1, code, true);
            let P4::ConnAck(ack) = P4::read(&mut buf, MAX).unwrap() else {
                panic!("CONNACK expected")
            };
            assert_eq!((ack.code, ack.session_present), (r4, true));
            write_connack(&mut buf, Version::V5, code, true);
            let P5::ConnAck(ack) = P5::read(&mut buf, None).unwrap() else {
                panic!("CONNACK expected")
            };
            assert_eq!((ack.code, ack.session_present, ack.properties), (r5, true, None));
            // mqttbytes (the codec's own client side) agrees.
            write_connack(&mut buf, Version::V5, code, false);
            let mqttbytes::v5::Packet::ConnAck(ack) = mqttbytes::v5::read(&mut buf, MAX).unwrap() else {
                panic!("CONNACK expected")
            };
            assert_eq!(ack.code as u8, code.code(Version::V5));
        }
    }

    // ---- PUBACK ----

    #[test]
    fn puback_bytes() {
        let v3 = bytes_of(|b| write_puback(b, Version::V3_1_1, 0x0102, PubAckCode::Success));
        assert_eq!(v3, [0x40, 0x02, 0x01, 0x02]);
        let v3_failure = bytes_of(|b| write_puback(b, Version::V3_1_1, 0x0102, PubAckCode::TopicNameInvalid));
        assert_eq!(v3_failure, v3);
        let mut mqttbytes_v3 = BytesMut::new();
        mqttbytes::v4::PubAck::new(0x0102)
            .write(&mut mqttbytes_v3)
            .unwrap();
        assert_eq!(mqttbytes_v3.as_ref(), &v3[..]);

        let ok = bytes_of(|b| write_puback(b, Version::V5, 7, PubAckCode::Success));
        assert_eq!(ok, [0x40, 0x02, 0x00, 0x07]);
        let topic = bytes_of(|b| write_puback(b, Version::V5, 7, PubAckCode::TopicNameInvalid));
        assert_eq!(topic, [0x40, 0x04, 0x00, 0x07, 0x90, 0x00]);
        let payload = bytes_of(|b| write_puback(b, Version::V5, 7, PubAckCode::PayloadFormatInvalid));
        assert_eq!(payload, [0x40, 0x04, 0x00, 0x07, 0x99, 0x00]);
    }

    #[test]
    fn puback_v5_is_accepted_by_client_decoders() {
        use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason as R};
        let cases = [
            (PubAckCode::Success, R::Success),
            (PubAckCode::TopicNameInvalid, R::TopicNameInvalid),
            (PubAckCode::PayloadFormatInvalid, R::PayloadFormatInvalid),
            (
                PubAckCode::ImplementationSpecificError,
                R::ImplementationSpecificError,
            ),
            (PubAckCode::NotAuthorized, R::NotAuthorized),
            (PubAckCode::QuotaExceeded, R::QuotaExceeded),
        ];
        for (code, reason) in cases {
            let mut buf = BytesMut::new();
            write_puback(&mut buf, Version::V5, 300, code);
            let Packet::PubAck(ack) = Packet::read(&mut buf, None).unwrap() else {
                panic!("PUBACK expected")
            };
            assert_eq!((ack.pkid, ack.reason), (300, reason));
            assert!(buf.is_empty());
        }
        // rumqttc's v5 client has no name for 0x95 in PUBACK; check the bytes directly.
        let bytes = bytes_of(|b| write_puback(b, Version::V5, 1, PubAckCode::PacketTooLarge));
        assert_eq!(bytes, [0x40, 0x04, 0x00, 0x01, 0x95, 0x00]);
    }

    // ---- SUBACK / UNSUBACK ----

    #[test]
    fn suback_with_a_refused_filter() {
        let results = [Ok(1), Err(()), Ok(0)];
        let v3 = bytes_of(|b| write_suback(b, Version::V3_1_1, 10, &results));
        assert_eq!(v3, [0x90, 0x05, 0x00, 0x0A, 0x01, 0x80, 0x00]);
        let v5 = bytes_of(|b| write_suback(b, Version::V5, 10, &results));
        assert_eq!(v5, [0x90, 0x06, 0x00, 0x0A, 0x00, 0x01, 0x8F, 0x00]);

        use mqttbytes::v4::{SubAck, SubscribeReasonCode};
        let mut expected = BytesMut::new();
        let codes = vec![
            SubscribeReasonCode::Success(mqttbytes::QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(mqttbytes::QoS::AtMostOnce),
        ];
        SubAck::new(10, codes).write(&mut expected).unwrap();
        assert_eq!(expected.as_ref(), &v3[..]);

        use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode as R};
        let mut buf = BytesMut::from(&v5[..]);
        let Packet::SubAck(ack) = Packet::read(&mut buf, None).unwrap() else {
            panic!("SUBACK expected")
        };
        assert_eq!(ack.pkid, 10);
        assert_eq!(
            ack.return_codes,
            [
                R::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
                R::TopicFilterInvalid,
                R::Success(rumqttc::v5::mqttbytes::QoS::AtMostOnce)
            ]
        );
        let mut buf = BytesMut::from(&v3[..]);
        assert!(matches!(
            rumqttc::mqttbytes::v4::Packet::read(&mut buf, MAX),
            Ok(rumqttc::Packet::SubAck(_))
        ));
    }

    #[test]
    fn suback_invalid_granted_qos_is_written_as_refusal() {
        let bytes = bytes_of(|b| write_suback(b, Version::V3_1_1, 1, &[Ok(3)]));
        assert_eq!(bytes, [0x90, 0x03, 0x00, 0x01, 0x80]);
    }

    #[test]
    fn large_suback_uses_a_two_byte_remaining_length() {
        let results = vec![Ok(1); 200];
        let mut buf = BytesMut::new();
        write_suback(&mut buf, Version::V5, 2, &results);
        assert_eq!(&buf[..3], &[0x90, 0xCB, 0x01]); // 203 = 0x4B | 0x80, then 1
        let rumqttc::v5::mqttbytes::v5::Packet::SubAck(ack) =
            rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, None).unwrap()
        else {
            panic!("SUBACK expected")
        };
        assert_eq!(ack.return_codes.len(), 200);
    }

    #[test]
    fn unsuback_bytes() {
        let v3 = bytes_of(|b| write_unsuback(b, Version::V3_1_1, 0x0203, 2));
        assert_eq!(v3, [0xB0, 0x02, 0x02, 0x03]);
        let mut expected = BytesMut::new();
        mqttbytes::v4::UnsubAck::new(0x0203).write(&mut expected).unwrap();
        assert_eq!(expected.as_ref(), &v3[..]);
        let v5 = bytes_of(|b| write_unsuback(b, Version::V5, 0x0203, 2));
        assert_eq!(v5, [0xB0, 0x05, 0x02, 0x03, 0x00, 0x00, 0x00]);
        let mut buf = BytesMut::from(&v5[..]);
        let rumqttc::v5::mqttbytes::v5::Packet::UnsubAck(ack) =
            rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, None).unwrap()
        else {
            panic!("UNSUBACK expected")
        };
        assert_eq!((ack.pkid, ack.reasons.len()), (0x0203, 2));
    }

    // ---- PUBLISH, PINGRESP, DISCONNECT ----

    #[test]
    fn publish_round_trips_through_client_decoders() {
        let payload = vec![b'p'; 150]; // two-byte remaining length
        for qos in [0u8, 1] {
            let pkid = u16::from(qos) * 77;
            let topic = "v1/devices/me/rpc/request/1";

            // 3.1.1: same bytes as mqttbytes' writer, and mqttbytes' and rumqttc's decoders agree.
            let mut ours = BytesMut::new();
            write_publish(&mut ours, Version::V3_1_1, topic, qos, pkid, &payload);
            let q = if qos == 0 {
                mqttbytes::QoS::AtMostOnce
            } else {
                mqttbytes::QoS::AtLeastOnce
            };
            let mut theirs = BytesMut::new();
            let mut p = mqttbytes::v4::Publish::new(topic, q, payload.clone());
            p.pkid = pkid;
            p.write(&mut theirs).unwrap();
            assert_eq!(ours, theirs);
            let mut buf = ours.clone();
            let mqttbytes::v4::Packet::Publish(p) = mqttbytes::v4::read(&mut buf, MAX).unwrap() else {
                panic!("PUBLISH expected")
            };
            assert_eq!(
                (p.topic.as_str(), p.qos as u8, p.pkid, &p.payload[..]),
                (topic, qos, pkid, &payload[..])
            );
            let mut buf = ours.clone();
            let rumqttc::Packet::Publish(p) = rumqttc::mqttbytes::v4::Packet::read(&mut buf, MAX).unwrap()
            else {
                panic!("PUBLISH expected")
            };
            assert_eq!(
                (p.topic.as_str(), p.qos as u8, p.pkid, &p.payload[..]),
                (topic, qos, pkid, &payload[..])
            );

            // 5: same bytes as mqttbytes' writer (empty properties), decoded by both clients.
            let mut ours = BytesMut::new();
            write_publish(&mut ours, Version::V5, topic, qos, pkid, &payload);
            let mut theirs = BytesMut::new();
            let mut p = mqttbytes::v5::Publish::new(topic, q, payload.clone());
            p.pkid = pkid;
            p.write(&mut theirs).unwrap();
            assert_eq!(ours, theirs);
            let mut buf = ours.clone();
            let mqttbytes::v5::Packet::Publish(p) = mqttbytes::v5::read(&mut buf, MAX).unwrap() else {
                panic!("PUBLISH expected")
            };
            assert_eq!(
                (p.topic.as_str(), p.qos as u8, p.pkid, &p.payload[..]),
                (topic, qos, pkid, &payload[..])
            );
            let mut buf = ours.clone();
            let rumqttc::v5::mqttbytes::v5::Packet::Publish(p) =
                rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, None).unwrap()
            else {
                panic!("PUBLISH expected")
            };
            assert_eq!(
                (&p.topic[..], p.qos as u8, p.pkid, &p.payload[..]),
                (topic.as_bytes(), qos, pkid, &payload[..])
            );
        }
    }

    #[test]
    fn publish_the_codec_cannot_encode_writes_nothing() {
        let mut buf = BytesMut::new();
        write_publish(&mut buf, Version::V3_1_1, "t", 3, 1, b"x");
        write_publish(&mut buf, Version::V3_1_1, "t", 1, 0, b"x");
        write_publish(&mut buf, Version::V5, &"t".repeat(70_000), 0, 0, b"x");
        assert!(buf.is_empty());
    }

    #[test]
    fn pingresp_and_disconnect_bytes() {
        for v in [Version::V3_1_1, Version::V5] {
            assert_eq!(bytes_of(|b| write_pingresp(b, v)), [0xD0, 0x00]);
        }
        assert!(
            bytes_of(|b| write_disconnect(b, Version::V3_1_1, DisconnectCode::SessionTakenOver)).is_empty()
        );
        let codes = [
            (DisconnectCode::ImplementationSpecificError, 0x83),
            (DisconnectCode::SessionTakenOver, 0x8E),
            (DisconnectCode::MessageRateTooHigh, 0x96),
            (DisconnectCode::QuotaExceeded, 0x97),
            (DisconnectCode::AdministrativeAction, 0x98),
            (DisconnectCode::PacketTooLarge, 0x95),
            (DisconnectCode::MalformedPacket, 0x81),
            (DisconnectCode::ProtocolError, 0x82),
            (DisconnectCode::KeepAliveTimeout, 0x8D),
        ];
        for (code, rc) in codes {
            let bytes = bytes_of(|b| write_disconnect(b, Version::V5, code));
            assert_eq!(bytes, [0xE0, 0x02, rc, 0x00], "{code:?}");
            let mut buf = BytesMut::from(&bytes[..]);
            let rumqttc::v5::mqttbytes::v5::Packet::Disconnect(d) =
                rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, None).unwrap()
            else {
                panic!("DISCONNECT expected")
            };
            assert_eq!(d.reason_code as u8, rc);
        }
    }
}
