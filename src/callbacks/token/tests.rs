use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};

use super::*;

const SECRET: &str = "k1-0123456789abcdef";
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

fn ids() -> CallbackIds {
    CallbackIds {
        command_id: "c-1".into(),
        stream_id: "st-1".into(),
        bot_session_id: "s-1".into(),
        target: Target::Queue("qu-1".into()),
    }
}

fn signer(secret: &str) -> TokenSigner {
    TokenSigner::new(SecretString::from(secret), vec![], WEEK)
}

fn rotated(current: &str, previous: &[&str]) -> TokenSigner {
    let previous = previous.iter().map(|s| SecretString::from(*s)).collect();
    TokenSigner::new(SecretString::from(current), previous, WEEK)
}

fn kid_of(secret: &str) -> String {
    kid(&SecretString::from(secret))
}

fn decoded(segment: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
}

/// A JWT made by hand, not by the library under test: `header` and `claims` as given, signed
/// with HMAC-SHA256 under `secret` whatever the header says.
fn craft(header: &Value, claims: &Value, secret: &str) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let message = format!("{}.{}", part(header), part(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    format!(
        "{message}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fn claims_expiring_at(exp: u64) -> Value {
    let mut claims = serde_json::to_value(ids()).unwrap();
    claims["exp"] = exp.into();
    claims
}

fn in_a_day() -> u64 {
    epoch_secs(SystemTime::now()) + 24 * 3600
}

#[test]
fn a_token_is_an_hs256_jwt_with_the_ids_exp_and_the_kid_of_the_secret() {
    let s = signer(SECRET);
    let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let token = s.sign_at(&ids(), issued);
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "{token} is not one URL-safe path segment"
    );
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert_eq!(
        decoded(parts[0]),
        json!({"typ": "JWT", "alg": "HS256", "kid": kid_of(SECRET)})
    );
    assert_eq!(
        decoded(parts[1]),
        json!({"c": "c-1", "s": "st-1", "b": "s-1", "t": {"type": "queue", "id": "qu-1"},
               "exp": 1_800_000_000 + WEEK.as_secs()})
    );
    // The signature is HMAC-SHA256 under the secret over the first two segments.
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
    assert_eq!(
        URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        mac.finalize().into_bytes().to_vec()
    );
}

#[test]
fn signed_tokens_verify_and_carry_the_ids() {
    let s = signer(SECRET);
    assert_eq!(s.verify(&s.sign(&ids())), Ok(ids()));
}

#[test]
fn the_kid_is_8_hex_digits_derived_from_the_secret_alone() {
    let a = kid_of(SECRET);
    assert_eq!(a.len(), 8);
    assert!(
        a.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(
        a,
        kid_of(SECRET),
        "the same secret, the same kid, on every replica"
    );
    assert_ne!(a, kid_of("k2-0123456789abcdef"));
    // Not the bare hash of the secret: the label is part of it.
    let bare = Sha256::digest(SECRET.as_bytes());
    assert_ne!(
        a,
        format!(
            "{:02x}{:02x}{:02x}{:02x}",
            bare[0], bare[1], bare[2], bare[3]
        )
    );
}

#[test]
fn tokens_expire_after_their_ttl_with_no_leeway() {
    let s = signer(SECRET);
    let issued = SystemTime::now();
    let token = s.sign_at(&ids(), issued);
    let last_second = issued + WEEK - Duration::from_secs(1);
    assert_eq!(s.verify_at(&token, last_second), Ok(ids()));
    assert_eq!(s.verify_at(&token, issued + WEEK), Err(TokenError::Expired));
    // And at the system clock's time: a token that expired a second ago is refused.
    let old = s.sign_at(&ids(), issued - WEEK - Duration::from_secs(1));
    assert_eq!(s.verify(&old), Err(TokenError::Expired));
}

#[test]
fn a_jwt_without_exp_is_refused() {
    let header = json!({"alg": "HS256", "kid": kid_of(SECRET)});
    let claims = serde_json::to_value(ids()).unwrap();
    assert_eq!(
        signer(SECRET).verify(&craft(&header, &claims, SECRET)),
        Err(TokenError::Invalid)
    );
    // The same with `exp` is taken: `craft` makes tokens the signer would accept.
    let good = craft(&header, &claims_expiring_at(in_a_day()), SECRET);
    assert_eq!(signer(SECRET).verify(&good), Ok(ids()));
}

#[test]
fn a_token_signed_with_a_previous_secret_verifies_and_only_the_current_one_signs() {
    const OLD: &str = "old-secret-0123456789";
    const NEW: &str = "new-secret-0123456789";
    let before = signer(OLD).sign(&ids());
    let s = rotated(NEW, &[OLD]);
    assert_eq!(s.verify(&before), Ok(ids()));
    let after = s.sign(&ids());
    assert_eq!(
        decoded(after.split('.').next().unwrap())["kid"],
        kid_of(NEW)
    );
    assert_eq!(signer(NEW).verify(&after), Ok(ids()));
    assert_eq!(signer(OLD).verify(&after), Err(TokenError::UnknownKey));
    // Once the previous secret is dropped, its tokens are refused.
    assert_eq!(signer(NEW).verify(&before), Err(TokenError::UnknownKey));
}

#[test]
fn a_token_of_an_unknown_secret_is_refused_whatever_its_kid() {
    let s = signer(SECRET);
    let other = signer("other-secret-000000").sign(&ids());
    assert_eq!(s.verify(&other), Err(TokenError::UnknownKey));
    // Our kid on a token signed with another secret.
    let header = json!({"alg": "HS256", "kid": kid_of(SECRET)});
    let forged = craft(
        &header,
        &claims_expiring_at(in_a_day()),
        "other-secret-000000",
    );
    assert_eq!(s.verify(&forged), Err(TokenError::Invalid));
    // No kid at all, though signed with our secret: the key is chosen by kid only.
    let header = json!({"alg": "HS256"});
    let no_kid = craft(&header, &claims_expiring_at(in_a_day()), SECRET);
    assert_eq!(s.verify(&no_kid), Err(TokenError::UnknownKey));
}

#[test]
fn other_algorithms_are_refused_even_with_our_secret_and_kid() {
    let s = signer(SECRET);
    let claims = claims_expiring_at(in_a_day());
    // `none`, with and without a signature.
    let none = craft(
        &json!({"alg": "none", "kid": kid_of(SECRET)}),
        &claims,
        SECRET,
    );
    let (unsigned, _) = none.rsplit_once('.').unwrap();
    assert!(s.verify(&none).is_err());
    assert!(s.verify(&format!("{unsigned}.")).is_err());
    // RS256 naming our kid, signed with HMAC over the secret: the key-confusion attack.
    let rs256 = craft(
        &json!({"alg": "RS256", "kid": kid_of(SECRET)}),
        &claims,
        SECRET,
    );
    assert_eq!(s.verify(&rs256), Err(TokenError::Invalid));
    // A genuine HS384 token under our secret and kid.
    let mut header = Header::new(Algorithm::HS384);
    header.kid = Some(kid_of(SECRET));
    let hs384 = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(s.verify(&hs384), Err(TokenError::Invalid));
    // The same claims under HS256 pass, so the algorithm is what was refused.
    let hs256 = craft(
        &json!({"alg": "HS256", "kid": kid_of(SECRET)}),
        &claims,
        SECRET,
    );
    assert_eq!(s.verify(&hs256), Ok(ids()));
}

#[test]
fn tampered_swapped_and_truncated_tokens_are_refused() {
    let s = signer(SECRET);
    let token = s.sign(&ids());
    let parts: Vec<&str> = token.split('.').collect();
    let mut other = claims_expiring_at(in_a_day());
    other["c"] = "c-2".into();
    let swapped = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).unwrap());
    let cases = [
        format!("{}.{swapped}.{}", parts[0], parts[2]),
        format!("{}.{}.", parts[0], parts[1]),
        format!("{}.{}", parts[0], parts[1]),
        token[..token.len() - 2].to_owned(),
        format!("{token}."),
        format!(".{token}"),
        parts[1].to_owned(),
        String::new(),
        "..".to_owned(),
        ".".to_owned(),
    ];
    for case in &cases {
        assert!(s.verify(case).is_err(), "{case}");
    }
}

#[test]
fn a_legacy_token_is_honoured_until_it_expires() {
    let s = signer(SECRET);
    let now = epoch_secs(SystemTime::now());
    let token = legacy::sign(SECRET, &ids(), Some(now + 3600));
    assert_eq!(token.matches('.').count(), 1, "{token}");
    assert_eq!(s.verify(&token), Ok(ids()));
    let expired = legacy::sign(SECRET, &ids(), Some(now - 1));
    assert_eq!(s.verify(&expired), Err(TokenError::Expired));
    let at_expiry = legacy::sign(SECRET, &ids(), Some(now));
    assert_eq!(s.verify(&at_expiry), Err(TokenError::Expired));
}

#[test]
fn a_legacy_token_verifies_under_a_previous_secret_and_nothing_else() {
    const OLD: &str = "old-secret-0123456789";
    let token = legacy::sign(OLD, &ids(), Some(in_a_day()));
    assert_eq!(rotated(SECRET, &[OLD]).verify(&token), Ok(ids()));
    assert_eq!(signer(SECRET).verify(&token), Err(TokenError::Invalid));
    // The earliest tokens had no expiry: refused, as before.
    let timeless = legacy::sign(SECRET, &ids(), None);
    assert_eq!(signer(SECRET).verify(&timeless), Err(TokenError::Malformed));
    // A legacy payload under a tag of the wrong secret, and one with its payload changed.
    let (payload, tag) = token.split_once('.').unwrap();
    let mut other = serde_json::to_value(ids()).unwrap();
    other["c"] = "c-2".into();
    other["e"] = in_a_day().into();
    let swapped = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).unwrap());
    let s = rotated(SECRET, &[OLD]);
    assert_eq!(
        s.verify(&format!("{swapped}.{tag}")),
        Err(TokenError::Invalid)
    );
    assert!(s.verify(&format!("{payload}.{}", &tag[1..])).is_err());
}

/// Property tests at the relay's door: any string is refused unless we signed it.
mod props {
    use proptest::prelude::*;

    use super::*;

    fn any_ids() -> impl Strategy<Value = CallbackIds> {
        (".{0,40}", ".{0,40}", ".{0,40}", ".{1,40}", any::<bool>()).prop_map(
            |(c, s, b, t, agent)| CallbackIds {
                command_id: c,
                stream_id: s,
                bot_session_id: b,
                target: if agent {
                    Target::Agent(t)
                } else {
                    Target::Queue(t)
                },
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn any_string_is_refused(token in ".{0,300}") {
            prop_assert!(signer(SECRET).verify(&token).is_err());
        }

        #[test]
        fn any_string_shaped_like_a_legacy_token_is_refused(
            payload in "[A-Za-z0-9_-]{0,200}",
            tag in "[A-Za-z0-9_-]{0,60}",
        ) {
            let token = format!("{payload}.{tag}");
            prop_assert!(signer(SECRET).verify(&token).is_err());
        }

        #[test]
        fn any_string_shaped_like_a_jwt_is_refused(
            header in "[A-Za-z0-9_-]{0,80}",
            claims in "[A-Za-z0-9_-]{0,200}",
            tag in "[A-Za-z0-9_-]{0,60}",
        ) {
            let token = format!("{header}.{claims}.{tag}");
            prop_assert!(signer(SECRET).verify(&token).is_err());
        }

        #[test]
        fn any_claims_under_our_header_but_not_our_signature_are_refused(
            claims in any::<Vec<u8>>(),
            tag in any::<[u8; 32]>(),
        ) {
            let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid_of(SECRET)});
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()),
                URL_SAFE_NO_PAD.encode(claims),
                URL_SAFE_NO_PAD.encode(tag),
            );
            prop_assert!(signer(SECRET).verify(&token).is_err());
        }

        #[test]
        fn signed_ids_round_trip_and_any_one_byte_change_is_refused(
            ids in any_ids(),
            at in any::<prop::sample::Index>(),
            with in "[A-Za-z0-9_.-]",
        ) {
            let s = signer(SECRET);
            let token = s.sign(&ids);
            prop_assert_eq!(s.verify(&token), Ok(ids));
            let i = at.index(token.len());
            let mut changed = token.clone();
            changed.replace_range(i..=i, &with);
            if changed != token {
                prop_assert!(s.verify(&changed).is_err(), "{}", changed);
            }
        }

        #[test]
        fn legacy_tokens_round_trip_and_any_one_byte_change_is_refused(
            ids in any_ids(),
            at in any::<prop::sample::Index>(),
            with in "[A-Za-z0-9_.-]",
        ) {
            let s = signer(SECRET);
            let token = legacy::sign(SECRET, &ids, Some(in_a_day()));
            prop_assert_eq!(s.verify(&token), Ok(ids));
            let i = at.index(token.len());
            let mut changed = token.clone();
            changed.replace_range(i..=i, &with);
            if changed != token {
                prop_assert!(s.verify(&changed).is_err(), "{}", changed);
            }
        }
    }
}
