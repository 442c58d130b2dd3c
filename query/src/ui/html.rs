//! HTML building blocks: escaping, exact figures, tables and charts drawn as inline SVG.
//!
//! Every value that did not come from this module's own literals goes through [`esc`]. SVG is
//! drawn with presentation attributes only (no `style` attribute), so the Content-Security-Policy
//! needs no `'unsafe-inline'`.

use std::fmt::Write;

use rust_decimal::Decimal;

use super::json::Json;

/// `text` escaped for HTML text and double-quoted attribute values.
pub fn esc(text: &str) -> String {
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

/// `text` percent-encoded for a URL query value.
pub fn url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            other => {
                let _ = write!(out, "%{other:02X}");
            }
        }
    }
    out
}

/// A money or quantity figure exactly as the API wrote it (normalised, never through a float);
/// `—` when absent.
pub fn exact(value: &Json) -> String {
    match value.decimal() {
        Some(decimal) => decimal.normalize().to_string(),
        None => "—".into(),
    }
}

/// A share 0..1 as a percentage with one decimal (display only).
pub fn percent(value: &Json) -> String {
    match value.float() {
        Some(share) => format!("{:.1}%", share * 100.0),
        None => "—".into(),
    }
}

/// Milliseconds as the API wrote them, with the unit.
pub fn millis(value: &Json) -> String {
    if value.is_null() { "—".into() } else { format!("{} ms", esc(value.text())) }
}

/// A figure's cell with a test id: `<td class="num" data-testid="...">value</td>` (`value`
/// already escaped).
pub fn cell(test_id: &str, value: &str) -> String {
    format!("<td class=\"num\" data-testid=\"{}\">{value}</td>", esc(test_id))
}

/// A figure card: label, value and a test id.
pub fn card(label: &str, test_id: &str, value: &str, note: &str) -> String {
    let note = if note.is_empty() { String::new() } else { format!("<p class=\"note\">{note}</p>") };
    format!(
        "<div class=\"card\"><p class=\"label\">{}</p><p class=\"figure\" data-testid=\"{}\">{value}</p>{note}</div>",
        esc(label),
        esc(test_id)
    )
}

/// One bar of a chart: its label (shown under the axis) and value.
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    /// Shown in the bar's tooltip, exactly.
    pub value_text: String,
    /// For drawing only.
    pub value: f64,
}

const CHART_WIDTH: f64 = 640.0;
const CHART_HEIGHT: f64 = 180.0;
const CHART_BOTTOM: f64 = 22.0;

/// A bar chart as inline SVG, with a title for screen readers and a tooltip per bar.
pub fn bar_chart(title: &str, bars: &[Bar]) -> String {
    let mut svg = chart_open(title);
    let max = bars.iter().map(|bar| bar.value).fold(0.0, f64::max);
    let plot = CHART_HEIGHT - CHART_BOTTOM;
    let slot = CHART_WIDTH / bars.len().max(1) as f64;
    let label_every = (bars.len() / 12).max(1);
    for (index, bar) in bars.iter().enumerate() {
        let height = if max > 0.0 { (bar.value / max * (plot - 16.0)).max(0.0) } else { 0.0 };
        let x = index as f64 * slot + slot * 0.1;
        let _ = write!(
            svg,
            "<rect class=\"bar\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\"><title>{}: {}</title></rect>",
            plot - height,
            slot * 0.8,
            esc(&bar.label),
            esc(&bar.value_text)
        );
        if index % label_every == 0 {
            let _ = write!(
                svg,
                "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + slot * 0.4,
                CHART_HEIGHT - 6.0,
                esc(&bar.label)
            );
        }
    }
    let _ = write!(svg, "<text class=\"axis\" x=\"2\" y=\"12\">max {}</text>", esc(&max_text(bars)));
    svg.push_str("</svg>");
    svg
}

fn max_text(bars: &[Bar]) -> String {
    bars.iter()
        .max_by(|a, b| a.value.total_cmp(&b.value))
        .map(|bar| bar.value_text.clone())
        .unwrap_or_default()
}

/// One line of a line chart: its name, CSS class and points (`None` where undefined).
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub class: &'static str,
    pub points: Vec<Option<f64>>,
}

/// A line chart as inline SVG, with x labels and a legend.
pub fn line_chart(title: &str, unit: &str, labels: &[String], lines: &[Line]) -> String {
    let mut svg = chart_open(title);
    let max = lines.iter().flat_map(|line| line.points.iter().flatten()).copied().fold(0.0, f64::max);
    let plot = CHART_HEIGHT - CHART_BOTTOM;
    let count = labels.len().max(1);
    let step = CHART_WIDTH / count as f64;
    let x_of = |index: usize| index as f64 * step + step / 2.0;
    let y_of = |value: f64| if max > 0.0 { plot - value / max * (plot - 14.0) } else { plot };
    for line in lines {
        let mut path = String::new();
        let mut pen_down = false;
        for (index, point) in line.points.iter().enumerate() {
            match point {
                Some(value) => {
                    let _ = write!(
                        path,
                        "{}{:.1} {:.1} ",
                        if pen_down { "L" } else { "M" },
                        x_of(index),
                        y_of(*value)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        if !path.is_empty() {
            let _ = write!(
                svg,
                "<path class=\"line {}\" d=\"{}\" fill=\"none\"><title>{}</title></path>",
                line.class,
                path.trim_end(),
                esc(&line.name)
            );
        }
        for (index, point) in line.points.iter().enumerate() {
            if let Some(value) = point {
                let _ = write!(
                    svg,
                    "<circle class=\"dot {}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\"><title>{} {}: {value} {}</title></circle>",
                    line.class,
                    x_of(index),
                    y_of(*value),
                    esc(&line.name),
                    esc(labels.get(index).map_or("", String::as_str)),
                    esc(unit)
                );
            }
        }
    }
    let label_every = (labels.len() / 10).max(1);
    for (index, label) in labels.iter().enumerate().filter(|(index, _)| index % label_every == 0) {
        let _ = write!(
            svg,
            "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x_of(index),
            CHART_HEIGHT - 6.0,
            esc(label)
        );
    }
    let _ = write!(svg, "<text class=\"axis\" x=\"2\" y=\"12\">max {max} {}</text>", esc(unit));
    svg.push_str("</svg>");
    let legend: String = lines
        .iter()
        .map(|line| format!("<li><span class=\"swatch {}\"></span>{}</li>", line.class, esc(&line.name)))
        .collect();
    format!("{svg}<ul class=\"legend\">{legend}</ul>")
}

fn chart_open(title: &str) -> String {
    format!(
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_WIDTH} {CHART_HEIGHT}\" role=\"img\" aria-label=\"{0}\" preserveAspectRatio=\"none\"><title>{0}</title><line class=\"axis-line\" x1=\"0\" y1=\"{1}\" x2=\"{CHART_WIDTH}\" y2=\"{1}\"/>",
        esc(title),
        CHART_HEIGHT - CHART_BOTTOM
    )
}

/// A decimal as a float for drawing.
pub fn draw(value: Option<Decimal>) -> f64 {
    use rust_decimal::prelude::ToPrimitive;
    value.and_then(|value| value.to_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_is_escaped() {
        assert_eq!(esc("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(url("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        let chart = bar_chart("<t>", &[Bar { label: "<x>".into(), value_text: "\"1\"".into(), value: 1.0 }]);
        assert!(!chart.contains("<x>") && !chart.contains("<t>") && !chart.contains("\"1\""), "{chart}");
    }

    #[test]
    fn figures_are_exact() {
        let json = Json::parse(r#"{"a": 0.1000000000000000000000000001, "b": 12.50}"#).expect("json");
        assert_eq!(exact(json.get("a")), "0.1000000000000000000000000001");
        assert_eq!(exact(json.get("b")), "12.5");
        assert_eq!(exact(json.get("c")), "—");
    }
}
