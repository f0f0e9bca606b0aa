//! The requests of the Nix HTTP binary-cache API as nixmesh serves them,
//! both on the LAN endpoint and on the localhost substituter. Pure: a
//! request path in, a route out. The URLs themselves are made in
//! `nix::binary_cache`.

use hyper::StatusCode;

use crate::nix::{HashPart, Sha256Hash};

/// Longest request path accepted; real ones are under 100 bytes.
pub const MAX_PATH_LEN: usize = 512;
const NIX32_SHA256_LEN: usize = crate::nix::base32::encoded_len(32);

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    CacheInfo,
    NarInfo(HashPart),
    Nar {
        hash: HashPart,
        nar_hash: Sha256Hash,
    },
    /// A file of an upstream cache, relayed by the substituter:
    /// `/upstream/<hash>-<FileHash digest>` (`nix::binary_cache::upstream_url`).
    UpstreamFile {
        hash: HashPart,
        file_hash: Sha256Hash,
    },
    /// Answer with this status and nothing else.
    Refuse(StatusCode),
}

pub fn route(path: &str) -> Route {
    if path.len() > MAX_PATH_LEN {
        return Route::Refuse(StatusCode::URI_TOO_LONG);
    }
    if path.contains("..") || path.contains("//") || path.contains('\\') {
        return Route::Refuse(StatusCode::BAD_REQUEST);
    }
    if path == "/nix-cache-info" {
        return Route::CacheInfo;
    }
    if let Some(hash) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix(".narinfo"))
    {
        return match HashPart::parse(hash) {
            Ok(h) => Route::NarInfo(h),
            Err(_) => Route::Refuse(StatusCode::BAD_REQUEST),
        };
    }
    if let Some(name) = path
        .strip_prefix("/nar/")
        .and_then(|p| p.strip_suffix(".nar"))
    {
        return hash_and_digest(name)
            .map(|(hash, nar_hash)| Route::Nar { hash, nar_hash })
            .unwrap_or(Route::Refuse(StatusCode::BAD_REQUEST));
    }
    if let Some(name) = path.strip_prefix("/upstream/") {
        return hash_and_digest(name)
            .map(|(hash, file_hash)| Route::UpstreamFile { hash, file_hash })
            .unwrap_or(Route::Refuse(StatusCode::BAD_REQUEST));
    }
    Route::Refuse(StatusCode::NOT_FOUND)
}

/// `<hash part>-<nix32 sha256 digest>`, the form `binary_cache` writes.
fn hash_and_digest(name: &str) -> Option<(HashPart, Sha256Hash)> {
    let (hash, digest) = name.split_once('-')?;
    let hash = HashPart::parse(hash).ok()?;
    if digest.len() != NIX32_SHA256_LEN {
        return None;
    }
    let digest = Sha256Hash::parse(&format!("sha256:{digest}")).ok()?;
    Some((hash, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "i9zj2x3nvfjjph275b20kf37h0nw1y3r";
    const N: &str = "1yyqyjpw2q4bg361ibwpnnrnkvijzh34wri22zwd3ndzan95b3rj";

    #[test]
    fn routes() {
        assert_eq!(route("/nix-cache-info"), Route::CacheInfo);
        assert_eq!(
            route(&format!("/{H}.narinfo")),
            Route::NarInfo(HashPart::parse(H).unwrap())
        );
        assert!(matches!(
            route(&format!("/nar/{H}-{N}.nar")),
            Route::Nar { .. }
        ));
        assert!(matches!(
            route(&format!("/upstream/{H}-{N}")),
            Route::UpstreamFile { .. }
        ));
        assert_eq!(
            route(&format!("/upstream/{H}-{N}.nar")),
            Route::Refuse(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn malformed_paths_are_refused() {
        let refuse = |p: &str| match route(p) {
            Route::Refuse(s) => s,
            other => panic!("{p} routed to {other:?}"),
        };
        assert_eq!(refuse("/abc.narinfo"), StatusCode::BAD_REQUEST);
        assert_eq!(
            refuse(&format!("/{}.narinfo", "e".repeat(32))),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(refuse("/../etc/passwd"), StatusCode::BAD_REQUEST);
        assert_eq!(refuse(&format!("/nar/{H}.nar")), StatusCode::BAD_REQUEST);
        assert_eq!(
            refuse(&format!("/nar/{H}-xyz.nar")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refuse(&format!("/{}", "a".repeat(600))),
            StatusCode::URI_TOO_LONG
        );
        assert_eq!(refuse("/"), StatusCode::NOT_FOUND);
        assert_eq!(refuse("/log/x"), StatusCode::NOT_FOUND);
    }

    proptest::proptest! {
        /// Every URL `nix::binary_cache` writes routes back to what it names.
        #[test]
        fn written_urls_route_back(
            hash in "[0-9abcdfghijklmnpqrsvwxyz]{32}",
            digest in proptest::array::uniform32(proptest::prelude::any::<u8>()),
        ) {
            let hash = HashPart::parse(&hash).unwrap();
            let nar_hash = Sha256Hash(digest);
            let url = format!("/nar/{hash}-{}.nar", nar_hash.nix32_digest());
            proptest::prop_assert_eq!(route(&url), Route::Nar { hash: hash.clone(), nar_hash });
            proptest::prop_assert_eq!(route(&format!("/{hash}.narinfo")), Route::NarInfo(hash));
        }

        /// Nix ≤ 2.31 aborts a substitution on a 5xx and 2.35 backs off
        /// 60 s on a 503: no request path, however odd, routes to one.
        #[test]
        fn no_path_is_answered_with_a_server_error(path in "/[ -~]{0,80}|/nar/[0-9a-z]{32}-[0-9a-z]{0,60}\\.nar") {
            if let Route::Refuse(status) = route(&path) {
                proptest::prop_assert!(status.is_client_error(), "{} for {:?}", status, path);
            }
        }
    }
}
