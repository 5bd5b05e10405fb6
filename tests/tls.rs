//! AMQPS: the TLS listener with a test CA generated at test time, next to the
//! plain listener; SASL PLAIN over TLS; SASL EXTERNAL with a client
//! certificate whose CN names the user; clients without a trusted
//! certificate refused when the broker requires one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use amqp_codec::methods::*;
use amqp_codec::{Frame, Method, PROTOCOL_HEADER, ShortStr, decode_frame, encode_method};
use bytes::{Bytes, BytesMut};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_tests::TestBroker;

struct Pki {
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate with CN=bob.
fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Warren test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "bob");
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

async fn start(verify: bool, require: bool) -> (TestBroker, Pki, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let pki = make_pki(certs.path());
    let data = tempfile::tempdir().unwrap();
    let c = certs.path().to_path_buf();
    let mut broker = TestBroker::start_with(data.path(), move |cfg| {
        cfg.tls = Some((
            SocketAddr::from(([127, 0, 0, 1], 0)),
            server::tls::TlsSettings {
                cert: c.join("server.pem"),
                key: c.join("server.key"),
                ca: Some(c.join("ca.pem")),
                verify_peer: verify,
                fail_if_no_peer_cert: require,
            },
        ));
    })
    .await;
    broker.own_dir(data);
    (broker, pki, certs)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(addr: SocketAddr, pki: &Pki, with_client_cert: bool) -> std::io::Result<Tls> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if with_client_cert {
        let cert = CertificateDer::from_pem_slice(pki.client_cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(pki.client_key_pem.as_bytes()).unwrap();
        builder.with_client_auth_cert(vec![cert], key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("127.0.0.1").unwrap().to_owned(), tcp)
        .await
}

async fn send(s: &mut Tls, channel: u16, m: Method) {
    let mut buf = BytesMut::new();
    encode_method(&mut buf, channel, &m).unwrap();
    s.write_all(&buf).await.unwrap();
}

async fn method(s: &mut Tls, buf: &mut BytesMut) -> Option<Method> {
    loop {
        if let Some(f) = decode_frame(buf, 0).unwrap() {
            if let Frame::Method { method, .. } = f {
                return Some(method);
            }
            continue;
        }
        if s.read_buf(buf).await.unwrap_or(0) == 0 {
            return None;
        }
    }
}

/// Runs the handshake over TLS; returns the open-ok or the close.
async fn handshake(
    s: &mut Tls,
    mechanism: &'static str,
    response: &'static [u8],
) -> (Vec<u8>, Option<Method>) {
    let mut buf = BytesMut::new();
    s.write_all(&PROTOCOL_HEADER).await.unwrap();
    let Some(Method::ConnectionStart(start)) = method(s, &mut buf).await else {
        panic!("no start")
    };
    send(
        s,
        0,
        ConnectionStartOk {
            client_properties: Default::default(),
            mechanism: ShortStr::from_static(mechanism),
            response: Bytes::from_static(response),
            locale: ShortStr::from_static("en_US"),
        }
        .into(),
    )
    .await;
    match method(s, &mut buf).await {
        Some(Method::ConnectionTune(_)) => {}
        other => return (start.mechanisms.to_vec(), other),
    }
    send(
        s,
        0,
        ConnectionTuneOk {
            channel_max: 10,
            frame_max: 131_072,
            heartbeat: 0,
        }
        .into(),
    )
    .await;
    send(
        s,
        0,
        ConnectionOpen {
            virtual_host: ShortStr::from_static("/"),
            ..Default::default()
        }
        .into(),
    )
    .await;
    (start.mechanisms.to_vec(), method(s, &mut buf).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_login_over_tls_beside_the_plain_listener() {
    let (broker, pki, _certs) = start(false, false).await;
    let tls_addr = broker.tls_addr().unwrap();
    let mut s = tls_connect(tls_addr, &pki, false).await.unwrap();
    let (mechanisms, opened) = handshake(&mut s, "PLAIN", b"\0guest\0guest").await;
    assert_eq!(mechanisms, b"EXTERNAL PLAIN AMQPLAIN");
    assert!(
        matches!(opened, Some(Method::ConnectionOpenOk(_))),
        "{opened:?}"
    );
    // The plain listener still works beside it.
    let conn = broker.connect().await;
    conn.create_channel().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_login_with_a_client_certificate() {
    let (broker, pki, _certs) = start(true, false).await;
    let b = broker.broker();
    b.add_user("bob", None, &[]).await.unwrap();
    b.set_permissions("bob", "/", ".*", ".*", ".*")
        .await
        .unwrap();
    let mut s = tls_connect(broker.tls_addr().unwrap(), &pki, true)
        .await
        .unwrap();
    let (mechanisms, opened) = handshake(&mut s, "EXTERNAL", b"").await;
    assert!(
        mechanisms.starts_with(b"EXTERNAL"),
        "{}",
        String::from_utf8_lossy(&mechanisms)
    );
    assert!(
        matches!(opened, Some(Method::ConnectionOpenOk(_))),
        "{opened:?}"
    );
    // Without a certificate EXTERNAL is offered (as RabbitMQ does on TLS)
    // but refused with 403.
    let mut s = tls_connect(broker.tls_addr().unwrap(), &pki, false)
        .await
        .unwrap();
    let (mechanisms, refused) = handshake(&mut s, "EXTERNAL", b"").await;
    assert!(mechanisms.starts_with(b"EXTERNAL"));
    match refused {
        Some(Method::ConnectionClose(close)) => {
            assert_eq!(close.reply_code, 403);
            assert_eq!(
                close.reply_text,
                "ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL. For details see the broker logfile."
            );
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_are_refused_when_required() {
    let (broker, pki, _certs) = start(true, true).await;
    let result = async {
        let mut s = tls_connect(broker.tls_addr().unwrap(), &pki, false).await?;
        // TLS 1.3 reports the refusal on the first read.
        s.write_all(&PROTOCOL_HEADER).await?;
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(b)
    }
    .await;
    assert!(
        result.is_err(),
        "a client without a certificate got through: {result:?}"
    );
    broker.stop().await;
}
