//! The test cluster's keys, made fresh for each server: a CA, kube-apiserver's serving
//! certificate for 127.0.0.1, localhost and the node address if any, its client certificate
//! for kubelets, and the ServiceAccount token signing key (all ECDSA P-256).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub struct Pki {
    pub ca_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    /// What kube-apiserver presents to kubelets (`--kubelet-client-certificate`).
    pub kubelet_client_cert_pem: String,
    pub kubelet_client_key_pem: String,
    /// PKCS#8, for `--service-account-signing-key-file`.
    pub service_account_key_pem: String,
    /// SubjectPublicKeyInfo, for `--service-account-key-file`.
    pub service_account_public_pem: String,
}

impl Pki {
    /// Keys for a server that also serves at `extra_ip`.
    pub fn generate(extra_ip: Option<Ipv4Addr>) -> anyhow::Result<Self> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "lastgasp test cluster CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?).context("the CA")?;

        let mut serving = CertificateParams::new(vec!["localhost".to_owned()])?;
        serving
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        if let Some(ip) = extra_ip {
            serving
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(ip)));
        }
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving
            .signed_by(&serving_key, &ca)
            .context("the serving certificate")?;

        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver-kubelet-client");
        client
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate()?;
        let client_cert = client
            .signed_by(&client_key, &ca)
            .context("the kubelet client certificate")?;

        let service_account = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca.pem(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            kubelet_client_cert_pem: client_cert.pem(),
            kubelet_client_key_pem: client_key.serialize_pem(),
            service_account_key_pem: service_account.serialize_pem(),
            service_account_public_pem: service_account.public_key_pem(),
        })
    }
}
