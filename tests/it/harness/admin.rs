//! A worker's admin listener as the tests read it: `/healthz`, `/readyz` and `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;

/// `GET http://{addr}{path}` within `limit`: status, content type and body; `None` when
/// nothing answers.
pub async fn try_get(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
) -> Option<(StatusCode, String, String)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(limit)
        .send()
        .await
        .ok()?;
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    Some((status, content_type, response.text().await.ok()?))
}

/// Like [`try_get`] within 5 s, and the listener must answer.
pub async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String, String) {
    try_get(addr, path, Duration::from_secs(5))
        .await
        .expect("the admin listener answers")
}

/// `/readyz`'s status; `None` when the listener does not answer.
pub async fn readyz(addr: SocketAddr) -> Option<StatusCode> {
    let (status, _, _) = try_get(addr, "/readyz", Duration::from_secs(2)).await?;
    Some(status)
}

/// `/metrics`, as series; `None` when the listener does not answer with them.
pub async fn scrape(addr: SocketAddr) -> Option<BTreeMap<String, f64>> {
    let (status, _, text) = try_get(addr, "/metrics", Duration::from_secs(2)).await?;
    (status == StatusCode::OK).then(|| series(&text))
}

/// The samples of a text exposition, by series as printed (`name{labels}`).
pub fn series(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("sample: {l}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("sample value: {l}"));
            (key.to_owned(), value)
        })
        .collect()
}

/// The sum of every series of a family (`name` or `name{…}`) in `series`.
pub fn family_sum(series: &BTreeMap<String, f64>, name: &str) -> f64 {
    series
        .iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}
