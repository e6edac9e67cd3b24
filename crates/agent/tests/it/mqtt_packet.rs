//! The little of MQTT 3.1.1 that the tests' scripted brokers speak: read one packet off a
//! socket, and build a SUBACK. Shared with the cloud's tests (`#[path]`), whose scripted
//! brokers stand for nodes of a broker cluster.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads one MQTT packet: its first byte and its body.
pub async fn read_packet(socket: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, Vec<u8>)> {
    let kind = socket.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = socket.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 || shift > 21 {
            break;
        }
    }
    let mut body = vec![0; len];
    socket.read_exact(&mut body).await?;
    Ok((kind, body))
}

/// The SUBACK of the SUBSCRIBE whose body is `subscribe`: `code` for every filter it names
/// (1: granted at QoS 1; 0x80: refused).
pub fn suback(subscribe: &[u8], code: u8) -> Vec<u8> {
    // Packet id, then (length, filter, options) per filter.
    let mut filters = 0;
    let mut at = 2;
    while at + 2 <= subscribe.len() {
        at += 2 + usize::from(u16::from_be_bytes([subscribe[at], subscribe[at + 1]])) + 1;
        filters += 1;
    }
    let mut ack = vec![0x90, 2 + filters as u8, subscribe[0], subscribe[1]];
    ack.extend(std::iter::repeat_n(code, filters));
    ack
}
