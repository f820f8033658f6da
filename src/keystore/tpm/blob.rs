//! Key blobs for today's connector: TPM2B_PUBLIC / TPM2B_PRIVATE exactly as
//! `tpm2_create -u/-r` writes them: a big-endian u16 size, then the structure
//! (TPMT_PUBLIC marshalled, or the private buffer).

use tss_esapi::structures::{Private, Public};
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

fn sized(body: &[u8]) -> Result<Vec<u8>, String> {
    let len = u16::try_from(body.len()).map_err(|_| "structure too large".to_string())?;
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

fn body_of(bytes: &[u8]) -> Result<&[u8], String> {
    let (size, body) = bytes
        .split_first_chunk::<2>()
        .ok_or_else(|| "file too short".to_string())?;
    if usize::from(u16::from_be_bytes(*size)) != body.len() {
        return Err("size prefix does not match the file length".into());
    }
    Ok(body)
}

pub fn encode_public(public: &Public) -> Result<Vec<u8>, String> {
    sized(&public.marshall().map_err(|e| e.to_string())?)
}

pub fn encode_private(private: &Private) -> Result<Zeroizing<Vec<u8>>, String> {
    sized(private.value()).map(Zeroizing::new)
}

pub fn decode_public(bytes: &[u8]) -> Result<Public, String> {
    Public::unmarshall(body_of(bytes)?).map_err(|e| e.to_string())
}

pub fn decode_private(bytes: &[u8]) -> Result<Private, String> {
    Private::try_from(body_of(bytes)?).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::Algorithm;

    #[test]
    fn public_round_trips_with_size_prefix() {
        for alg in Algorithm::ALL {
            let public = super::super::key::device_key_template(alg).unwrap();
            let blob = encode_public(&public).unwrap();
            assert_eq!(
                usize::from(u16::from_be_bytes([blob[0], blob[1]])),
                blob.len() - 2
            );
            assert_eq!(decode_public(&blob).unwrap(), public);
        }
    }

    #[test]
    fn private_round_trips_and_rejects_bad_sizes() {
        let private = Private::try_from(vec![7u8; 100]).unwrap();
        let blob = encode_private(&private).unwrap();
        assert_eq!(&blob[..2], &[0, 100]);
        assert_eq!(decode_private(&blob).unwrap(), private);
        assert!(decode_private(&blob[..50]).is_err());
        assert!(decode_private(&[0]).is_err());
    }
}
