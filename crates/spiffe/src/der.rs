//! The Workload API's certificate lists: DER certificates concatenated without separators
//! (`X509SVID.x509_svid`, `bundle`), split back into one buffer each.

/// A certificate list that is not a run of complete DER SEQUENCEs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate {index} is not a complete DER value ({left} bytes left)")]
pub struct SplitError {
    /// Position of the bad certificate in the list.
    pub index: usize,
    /// Bytes left from that position.
    pub left: usize,
}

/// Splits concatenated DER values into one buffer each (an empty input gives none).
pub fn split_certificates(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, SplitError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = der_len(bytes).ok_or(SplitError {
            index: out.len(),
            left: bytes.len(),
        })?;
        let (one, rest) = bytes.split_at(len);
        out.push(one.to_vec());
        bytes = rest;
    }
    Ok(out)
}

/// Total length (header included) of the DER SEQUENCE at the start of `b`, if it fits in `b`.
fn der_len(b: &[u8]) -> Option<usize> {
    // Certificates are SEQUENCEs (tag 0x30) with a definite length, which DER requires.
    if *b.first()? != 0x30 {
        return None;
    }
    let first = usize::from(*b.get(1)?);
    let (header, body) = if first < 0x80 {
        (2, first)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > std::mem::size_of::<usize>() {
            return None;
        }
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, byte| (acc << 8) | usize::from(*byte));
        (2 + n, len)
    };
    let total = header.checked_add(body)?;
    (total <= b.len()).then_some(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_der_splits_into_values() {
        let short = [0x30, 0x03, 1, 2, 3];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(7u8, 0x80));
        let joined = [&short[..], &long[..], &short[..]].concat();
        let parts = split_certificates(&joined).unwrap();
        assert_eq!(parts, vec![short.to_vec(), long.clone(), short.to_vec()]);
        assert_eq!(split_certificates(&[]).unwrap(), Vec::<Vec<u8>>::new());
        // Truncated, wrong tag, and an indefinite length are refused, naming the position.
        let err = split_certificates(&[&short[..], &long[..10]].concat()).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.to_string().contains("certificate 1"), "{err}");
        assert!(split_certificates(&[0x31, 0x00]).is_err());
        assert!(split_certificates(&[0x30, 0x80, 0, 0]).is_err());
    }
}
