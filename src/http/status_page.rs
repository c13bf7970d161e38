//! The status page (`GET /`): sources and their health, capacity in use, a timeline of the
//! latest builds (queued → pod created → running → finished, coloured by outcome) and what they
//! cost. Rendered on the server as one HTML document with an inline SVG: no script, no build
//! step, nothing fetched from elsewhere.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::status_api::{StatusPage, costs_by_project, safe_link, state_of};
use crate::build::Outcome;
use crate::coordinator::{BuildRecord, ColdWaitView, PoolView, SourceView};

/// Builds the page shows unless `?show=` asks for more.
const DEFAULT_SHOWN: usize = 100;

const STYLE: &str = include_str!("status_page.css");

/// Geometry of the timeline, in SVG user units.
const WIDTH: f64 = 1200.0;
const LABEL_WIDTH: f64 = 380.0;
const ROW: f64 = 20.0;
const AXIS: f64 = 24.0;
/// The narrowest a segment is drawn, so a build of a few milliseconds still shows.
const MIN_SEGMENT: f64 = 2.0;

/// `?show=N`: how many of the latest builds the timeline and table show.
#[derive(Debug, Deserialize)]
pub(crate) struct Shown {
    show: Option<usize>,
}

pub(crate) async fn page(State(state): State<AppState>, Query(query): Query<Shown>) -> Response {
    let builds = state.status.builds();
    let shown = query.show.unwrap_or(DEFAULT_SHOWN).max(1);
    let (used, total) = state.status.capacity();
    let html = render(&Page {
        sources: &state.status.sources(),
        pools: &state.status.warm_pools(),
        cold_waits: &state.status.cold_waits(),
        builds: &builds,
        shown,
        used,
        total,
        history_limit: state.status.history_limit(),
        settings: &state.status_page,
        now: SystemTime::now(),
    });
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Nothing on the page comes from elsewhere or runs.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'",
            ),
        ],
        html,
    )
        .into_response()
}

/// Everything the page shows.
pub(crate) struct Page<'a> {
    pub(crate) sources: &'a [SourceView],
    /// The warm pools.
    pub(crate) pools: &'a [PoolView],
    /// How long cold builds waited for their pod, by image.
    pub(crate) cold_waits: &'a [ColdWaitView],
    /// Alive builds first, then finished ones, newest first.
    pub(crate) builds: &'a [Arc<BuildRecord>],
    pub(crate) shown: usize,
    pub(crate) used: usize,
    pub(crate) total: usize,
    pub(crate) history_limit: usize,
    pub(crate) settings: &'a StatusPage,
    pub(crate) now: SystemTime,
}

/// The whole HTML document.
pub(crate) fn render(page: &Page<'_>) -> String {
    let shown = &page.builds[..page.shown.min(page.builds.len())];
    let mut out = String::with_capacity(4096 + shown.len() * 1200);
    let finished = page.builds.iter().filter(|b| b.end.is_some()).count();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>kiln status</title>\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    );
    if !page.settings.refresh.is_zero() {
        let _ = write!(
            out,
            "<meta http-equiv=\"refresh\" content=\"{}\">",
            page.settings.refresh.as_secs().max(1)
        );
    }
    let _ = write!(
        out,
        "<style>{STYLE}</style></head><body><header><h1>kiln <small>{}</small></h1>\
         <p id=\"capacity\">{} of {} build slots in use · {} of at most {} finished builds kept</p></header>",
        crate::VERSION,
        page.used,
        page.total,
        finished,
        page.history_limit
    );
    sources_section(&mut out, page);
    warm_section(&mut out, page);
    timeline_section(&mut out, shown, page);
    builds_section(&mut out, shown, page);
    costs_section(&mut out, page);
    let _ = write!(
        out,
        "<footer>The same data as JSON: <a href=\"api/v1/builds\">/api/v1/builds</a> · \
         <a href=\"api/v1/sources\">/api/v1/sources</a> · <a href=\"api/v1/costs\">/api/v1/costs</a> · \
         <a href=\"api/v1/warm\">/api/v1/warm</a> · \
         <a href=\"metrics\">/metrics</a></footer></body></html>"
    );
    out
}

fn sources_section(out: &mut String, page: &Page<'_>) {
    let _ = write!(
        out,
        "<section id=\"sources\"><h2>Sources</h2><table><thead><tr><th>source</th><th>name</th>\
         <th>URL</th><th>state</th><th>last success</th><th>last error</th><th>builds</th></tr></thead><tbody>"
    );
    for source in page.sources {
        let health = &source.health;
        let class = if !health.ready {
            "bad"
        } else if health.last_error.is_some() {
            "warn"
        } else {
            "ok"
        };
        let last_success = health.last_success.map_or_else(
            || "never".to_owned(),
            |at| format!("{} ago", ago(page.now, at)),
        );
        let limit = if source.limit > 0 {
            format!(" of {}", source.limit)
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<tr data-source=\"{kind}/{name}\"><td>{kind}</td><td>{name}</td><td>{url}</td>\
             <td><span class=\"badge {class}\">{state}</span></td><td>{last_success}</td>\
             <td class=\"error\">{error}</td><td>{builds}{limit}</td></tr>",
            kind = source.kind,
            name = escape(&source.name),
            url = escape(&health.url),
            state = escape(&health.state),
            error = escape(health.last_error.as_deref().unwrap_or("")),
            builds = source.builds,
        );
    }
    out.push_str("</tbody></table></section>");
}

/// The start of a build's bar: when its CI server queued it, else its launch.
fn start_of(record: &BuildRecord) -> SystemTime {
    record
        .about
        .queued_at
        .filter(|queued| *queued <= record.launched)
        .unwrap_or(record.launched)
}

fn timeline_section(out: &mut String, shown: &[Arc<BuildRecord>], page: &Page<'_>) {
    let _ = write!(
        out,
        "<section id=\"timeline\"><h2>Timeline of the latest {} builds</h2>\
         <p class=\"legend\"><span class=\"key queued\"></span>queued <span class=\"key starting\"></span>pod created \
         <span class=\"key running\"></span>running <span class=\"key succeeded\"></span>succeeded \
         <span class=\"key failed\"></span>failed <span class=\"key canceled\"></span>canceled \
         <span class=\"key lost\"></span>lost</p>",
        shown.len()
    );
    if shown.is_empty() {
        out.push_str("<p class=\"empty\">No builds yet.</p></section>");
        return;
    }
    let from = shown.iter().map(|b| start_of(b)).min().unwrap_or(page.now);
    let to = shown
        .iter()
        .map(|b| b.end.as_ref().map_or(page.now, |e| e.at))
        .max()
        .unwrap_or(page.now)
        .max(from + Duration::from_millis(1));
    let span = to.duration_since(from).unwrap_or_default().as_secs_f64();
    let bars = WIDTH - LABEL_WIDTH - 10.0;
    let x = |at: SystemTime| {
        let offset = at.duration_since(from).unwrap_or_default().as_secs_f64();
        LABEL_WIDTH + (offset / span).clamp(0.0, 1.0) * bars
    };
    let height = AXIS + ROW * shown.len() as f64 + 4.0;
    let _ = write!(
        out,
        "<svg id=\"timeline-chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {height}\" \
         width=\"100%\" role=\"img\" aria-label=\"timeline of the latest builds\">"
    );
    // The time axis: five ticks from the first start to the last end, the first as a clock
    // time (UTC) and the others as time after it.
    for tick in 0..=4 {
        let offset = span * f64::from(tick) / 4.0;
        let at = from + Duration::from_secs_f64(offset);
        let tx = x(at);
        let text = if tick == 0 {
            format!("{} UTC", clock(at))
        } else {
            format!("+{}", short(Duration::from_secs_f64(offset)))
        };
        let anchor = match tick {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = write!(
            out,
            "<line class=\"tick\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{AXIS}\" y2=\"{height}\"/>\
             <text class=\"axis\" x=\"{tx:.1}\" y=\"14\" text-anchor=\"{anchor}\">{text}</text>"
        );
    }
    for (row, record) in shown.iter().enumerate() {
        let y = AXIS + ROW * row as f64;
        let state = state_of(record);
        let end = record.end.as_ref().map_or(page.now, |e| e.at);
        let reason = failure_text(record);
        let _ = write!(
            out,
            "<g class=\"bar {state}\" data-build=\"{name}\" data-state=\"{state}\"><title>{title}</title>",
            name = escape(&record.name),
            title = escape(&tooltip(record, page.now)),
        );
        let label = format!(
            "{} #{} {}{}",
            record.key.source.short(),
            record.key.id,
            record.about.job,
            if reason.is_empty() {
                String::new()
            } else {
                format!(" — {reason}")
            }
        );
        let label = escape(&truncate(&label, 58));
        let text_y = y + ROW * 0.7;
        match safe_link(record.about.url.as_deref()) {
            Some(url) => {
                let _ = write!(
                    out,
                    "<a href=\"{}\"><text class=\"label\" x=\"4\" y=\"{text_y:.1}\">{label}</text></a>",
                    escape(&url)
                );
            }
            None => {
                let _ = write!(
                    out,
                    "<text class=\"label\" x=\"4\" y=\"{text_y:.1}\">{label}</text>"
                );
            }
        }
        // Queued until the pod was created, starting until it ran, then running (or its
        // outcome) until it ended.
        let created = record.created.or(record.running).unwrap_or(end);
        let running = record.running.unwrap_or(end);
        let last = match &record.end {
            Some(end) => end.outcome.as_str(),
            None => "running",
        };
        let segments = [
            ("queued", start_of(record), created),
            ("starting", created, running),
            (last, running, end),
        ];
        let bar_y = y + 3.0;
        let bar_h = ROW - 6.0;
        for (class, a, b) in segments {
            if b <= a && class != last {
                continue;
            }
            let (x1, x2) = (x(a), x(b));
            let _ = write!(
                out,
                "<rect class=\"segment {class}\" x=\"{x1:.1}\" y=\"{bar_y:.1}\" width=\"{:.1}\" height=\"{bar_h:.1}\"/>",
                (x2 - x1).max(MIN_SEGMENT)
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</svg></section>");
}

/// The failure reason and the coordinator's explanation, for failed builds.
fn failure_text(record: &BuildRecord) -> String {
    let Some(end) = &record.end else {
        return String::new();
    };
    let Outcome::Failed(reason) = end.outcome else {
        return String::new();
    };
    match end.exit_code {
        Some(code) => format!("{reason} (exit code {code})"),
        None => reason.as_str().to_owned(),
    }
}

fn tooltip(record: &BuildRecord, now: SystemTime) -> String {
    let mut text = format!(
        "{} · {} · {}",
        record.name, record.about.project, record.about.job
    );
    let _ = write!(text, "\n{}", state_of(record));
    if let Some(end) = &record.end {
        let _ = write!(text, ": {}", end.detail);
    }
    let _ = write!(
        text,
        "\nlaunched {}, {}",
        clock(record.launched),
        took(record, now)
    );
    text
}

fn builds_section(out: &mut String, shown: &[Arc<BuildRecord>], page: &Page<'_>) {
    let _ = write!(
        out,
        "<section id=\"builds\"><h2>Builds</h2><table><thead><tr><th>build</th><th>source</th>\
         <th>project</th><th>state</th><th>why</th><th>queued</th><th>took</th><th>class</th><th>cost</th></tr></thead><tbody>"
    );
    for record in shown {
        let state = state_of(record);
        let job = escape(&format!("#{} {}", record.key.id, record.about.job));
        let build = match safe_link(record.about.url.as_deref()) {
            Some(url) => format!("<a href=\"{}\">{job}</a>", escape(&url)),
            None => job,
        };
        let why = match &record.end {
            Some(end) if !matches!(end.outcome, Outcome::Succeeded) => {
                let reason = failure_text(record);
                if reason.is_empty() {
                    escape(&end.detail)
                } else {
                    format!(
                        "<span class=\"reason\">{}</span> {}",
                        escape(&reason),
                        escape(&end.detail)
                    )
                }
            }
            _ => String::new(),
        };
        let queued = record.about.queued_at.map_or_else(String::new, clock);
        let class = record
            .footprint
            .as_ref()
            .map(|f| {
                let name = f.class.as_deref().unwrap_or("default");
                format!("{} ({:.2} vCPU, {:.2} GiB)", escape(name), f.vcpu, f.gib)
            })
            .unwrap_or_default();
        let cost = record
            .end
            .as_ref()
            .and_then(|e| e.cost)
            .map(|c| money(c, &page.settings.currency))
            .unwrap_or_default();
        let _ = write!(
            out,
            "<tr class=\"{state}\" data-build=\"{name}\"><td>{build}</td><td>{source}/{runner}</td>\
             <td>{project}</td><td><span class=\"badge {state}\">{state}</span></td><td class=\"why\">{why}</td>\
             <td>{queued}</td><td>{took}</td><td class=\"class\">{class}</td><td class=\"cost\">{cost}</td></tr>",
            name = escape(&record.name),
            source = record.key.source.name(),
            runner = escape(&record.key.runner),
            project = escape(&record.about.project),
            took = took(record, page.now),
        );
    }
    let _ = write!(out, "</tbody></table>");
    if page.builds.len() > shown.len() {
        let _ = write!(
            out,
            "<p class=\"more\">{} more kept: <a href=\"?show={}\">show all</a></p>",
            page.builds.len() - shown.len(),
            page.builds.len()
        );
    }
    out.push_str("</section>");
}

fn costs_section(out: &mut String, page: &Page<'_>) {
    let projects = costs_by_project(page.builds);
    if projects.is_empty() {
        return;
    }
    let _ = write!(
        out,
        "<section id=\"costs\"><h2>Cost by project</h2><p class=\"note\">Over the finished builds \
         kept above; <code>kiln_build_cost_total</code> counts every build.</p><table><thead><tr>\
         <th>project</th><th>builds</th><th>pipelines</th><th>cost</th></tr></thead><tbody>"
    );
    for project in projects {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"cost\">{}</td></tr>",
            escape(&project.project),
            project.sum.builds,
            project.pipelines.len(),
            money(project.sum.cost, &page.settings.currency)
        );
    }
    out.push_str("</tbody></table></section>");
}

/// The warm pools (what each costs idle beside what it saves), and how long cold builds
/// waited for their pod per image (which pool would pay off). Nothing without either.
fn warm_section(out: &mut String, page: &Page<'_>) {
    if page.pools.is_empty() && page.cold_waits.is_empty() {
        return;
    }
    out.push_str("<section id=\"warm\"><h2>Warm pools</h2>");
    if page.pools.is_empty() {
        out.push_str(
            "<p class=\"empty\">No warm pool is configured (<code>[[warm_pools]]</code>).</p>",
        );
    } else {
        out.push_str(
            "<table><thead><tr><th>pool</th><th>source</th><th>image</th><th>floor</th><th>idle</th>\
             <th>starting</th><th>in use</th><th>refills</th><th>hit rate</th><th>idle cost today</th>\
             </tr></thead><tbody>",
        );
        for pool in page.pools {
            let served = pool.hits + pool.misses;
            let hit_rate = if served == 0 {
                "–".to_owned()
            } else {
                #[allow(clippy::cast_precision_loss)]
                let rate = pool.hits as f64 * 100.0 / served as f64;
                format!("{rate:.0}% ({} of {served})", pool.hits)
            };
            let cost = pool.idle_cost_today.map_or_else(
                || "not priced".to_owned(),
                |c| money(c, &page.settings.currency),
            );
            let _ = write!(
                out,
                "<tr data-pool=\"{name}\"><td>{name}</td><td>{source}</td><td>{image}</td><td>{floor}</td>\
                 <td>{idle}</td><td>{starting}</td><td>{in_use}</td><td>{refills}</td><td>{hit_rate}</td>\
                 <td class=\"cost\">{cost}</td></tr>",
                name = escape(&pool.name),
                source = escape(&pool.source),
                image = escape(pool.image.as_deref().unwrap_or("")),
                floor = pool.floor,
                idle = pool.idle,
                starting = pool.starting,
                in_use = pool.in_use,
                refills = pool.refills,
            );
        }
        out.push_str("</tbody></table>");
    }
    if !page.cold_waits.is_empty() {
        out.push_str(
            "<h3>Cold starts: how long builds waited for their pod</h3><p class=\"note\">From launch \
             until the build container ran, over the latest cold builds of each image: the wait a \
             warm pool for that image would save each build.</p><table><thead><tr><th>image</th>\
             <th>cold builds</th><th>p50</th><th>p90</th></tr></thead><tbody>",
        );
        for wait in page.cold_waits {
            let _ = write!(
                out,
                "<tr data-image=\"{image}\"><td>{image}</td><td>{builds}</td><td>{p50:.1} s</td><td>{p90:.1} s</td></tr>",
                image = escape(&wait.image),
                builds = wait.builds,
                p50 = wait.p50,
                p90 = wait.p90,
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");
}

/// An amount with enough decimals that a build of seconds does not show as zero.
fn money(amount: f64, currency: &str) -> String {
    let decimals = if amount >= 1.0 {
        2
    } else if amount >= 0.01 {
        4
    } else {
        6
    };
    format!("{amount:.decimals$} {}", escape(currency))
}

/// From launch to end (or now), and how long it waited before that.
fn took(record: &BuildRecord, now: SystemTime) -> String {
    let end = record.end.as_ref().map_or(now, |e| e.at);
    short(end.duration_since(record.launched).unwrap_or_default())
}

fn ago(now: SystemTime, at: SystemTime) -> String {
    short(now.duration_since(at).unwrap_or_default())
}

/// `850ms`, `2.5s`, `12s`, `3m 04s`, `2h 05m`.
fn short(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs < 10 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h {:02}m", secs / 3600, secs % 3600 / 60)
    }
}

/// `HH:MM:SS` UTC.
fn clock(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at)
        .format("%H:%M:%S")
        .to_string()
}

fn truncate(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Text made safe for HTML content and quoted attributes.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_section_shows_each_pool_and_the_cold_waits_by_image() {
        let pools = [PoolView {
            name: "maven".into(),
            source: "gitlab".into(),
            image: Some("maven:3.9<x>".into()),
            floor: 2,
            idle: 2,
            starting: 0,
            in_use: 1,
            refills: 5,
            hits: 3,
            misses: 1,
            idle_cost_today: Some(0.125),
        }];
        let waits = [ColdWaitView {
            image: "node:22".into(),
            builds: 4,
            p50: 12.0,
            p90: 31.5,
        }];
        let settings = StatusPage::default();
        let html = render(&Page {
            sources: &[],
            pools: &pools,
            cold_waits: &waits,
            builds: &[],
            shown: 10,
            used: 0,
            total: 4,
            history_limit: 10,
            settings: &settings,
            now: SystemTime::now(),
        });
        for expected in [
            "<tr data-pool=\"maven\"><td>maven</td><td>gitlab</td><td>maven:3.9&lt;x&gt;</td><td>2</td><td>2</td><td>0</td><td>1</td><td>5</td><td>75% (3 of 4)</td><td class=\"cost\">0.1250 USD</td></tr>",
            "<tr data-image=\"node:22\"><td>node:22</td><td>4</td><td>12.0 s</td><td>31.5 s</td></tr>",
        ] {
            assert!(html.contains(expected), "{expected} missing from {html}");
        }
    }
}
