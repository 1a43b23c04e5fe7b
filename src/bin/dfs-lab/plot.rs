//! `dfs-lab bench --plot FILE.svg`: the bench's medians drawn as bars, DFS beside the directory it
//! was compared with, each workload on its own scale (the longer of its two bars is full width), so
//! a reader sees at a glance which side each figure favours and by how much.

/// One workload's medians: DFS's and, when compared, the other side's.
pub struct Row<'a> {
    pub name: &'a str,
    pub unit: &'a str,
    pub higher_better: bool,
    pub dfs: f64,
    pub other: Option<f64>,
    /// The figure a full-width bar stands for; by default the row's larger one. Rows given the
    /// same one are drawn to one scale, so that bars can be compared across them.
    pub full: Option<f64>,
}

const WIDTH: f64 = 960.0;
const LABEL: f64 = 380.0;
const BAR: f64 = 14.0;
const ROW: f64 = 2.0 * BAR + 18.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn figure(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// An SVG document of `rows` under `title`; `other` names the compared side, and `ratio` says
/// what the ratio at the right of each row is (DFS's figure over the other's, or the other's over
/// DFS's where lower is better).
pub fn svg(title: &str, other: &str, rows: &[Row], ratio: &str) -> String {
    let height = 70.0 + ROW * rows.len() as f64 + 30.0;
    let span = WIDTH - LABEL - 150.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n\
         <rect x=\"10\" y=\"36\" width=\"12\" height=\"12\" fill=\"#2b6cb0\"/>\
         <text x=\"28\" y=\"46\">DFS</text>\n",
        escape(title)
    );
    if rows.iter().any(|r| r.other.is_some()) {
        s += &format!(
            "<rect x=\"80\" y=\"36\" width=\"12\" height=\"12\" fill=\"#a0aec0\"/><text x=\"98\" y=\"46\">{}</text>\n",
            escape(other)
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let y = 64.0 + ROW * i as f64;
        let top = r.full.unwrap_or(r.dfs.max(r.other.unwrap_or(0.0)));
        let scale = if top > 0.0 && top.is_finite() { span / top } else { 0.0 };
        let better = if r.higher_better { "higher is better" } else { "lower is better" };
        s += &format!(
            "<text x=\"10\" y=\"{}\">{}</text><text x=\"10\" y=\"{}\" fill=\"#718096\">{} ({better})</text>\n",
            y + BAR - 2.0,
            escape(r.name),
            y + 2.0 * BAR + 2.0,
            escape(r.unit)
        );
        let bars = [(r.dfs, "#2b6cb0")].into_iter().chain(r.other.map(|o| (o, "#a0aec0")));
        for (k, (v, colour)) in bars.enumerate() {
            let by = y + k as f64 * BAR;
            let w = if v.is_finite() { (v * scale).max(1.0) } else { 0.0 };
            s += &format!(
                "<rect x=\"{LABEL}\" y=\"{by}\" width=\"{w:.1}\" height=\"{}\" fill=\"{colour}\"/>\
                 <text x=\"{:.1}\" y=\"{}\">{}</text>\n",
                BAR - 2.0,
                LABEL + w + 4.0,
                by + BAR - 3.0,
                figure(v)
            );
        }
        if let Some(o) = r.other {
            let ratio = if r.higher_better { r.dfs / o } else { o / r.dfs };
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-weight=\"bold\">{}×</text>\n",
                WIDTH - 10.0,
                y + BAR + 4.0,
                figure(ratio)
            );
        }
    }
    if rows.iter().any(|r| r.other.is_some()) {
        s += &format!(
            "<text x=\"10\" y=\"{}\" fill=\"#718096\">right: {} (medians)</text>\n",
            height - 12.0,
            escape(ratio)
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_draws_each_figure_and_the_ratio_the_right_way_round() {
        let rows = [
            Row {
                name: "write <fast>",
                unit: "MiB/s",
                higher_better: true,
                dfs: 200.0,
                other: Some(100.0),
                full: None,
            },
            Row { name: "ls -lR", unit: "s", higher_better: false, dfs: 0.5, other: Some(1.0), full: None },
        ];
        let s = svg("bench & co", "MooseFS", &rows, "how many times better DFS did");
        assert!(s.contains("right: how many times better DFS did (medians)"), "{s}");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("write &lt;fast&gt;") && s.contains("bench &amp; co"), "names are escaped");
        // Twice as fast, and half the time: both 2× in DFS's favour.
        assert_eq!(s.matches("2.00×").count(), 2, "{s}");
        // The longer bar of a row spans the plot; the other is in proportion.
        let full = WIDTH - LABEL - 150.0;
        assert!(s.contains(&format!("width=\"{full:.1}\"")), "{s}");
        assert!(s.contains(&format!("width=\"{:.1}\"", full / 2.0)), "{s}");
        // Without a compared side: one bar a row and no ratio.
        let one =
            svg("t", "x", &[Row { name: "a", unit: "u", higher_better: true, dfs: 3.0, other: None, full: None }], "r");
        assert!(!one.contains('×'));
        // One scale for rows that share it: a figure half the shared full width is half as long.
        let shared =
            [2.0, 4.0].map(|v| Row { name: "n", unit: "u", higher_better: true, dfs: v, other: None, full: Some(4.0) });
        let s = svg("t", "x", &shared, "r");
        assert!(
            s.contains(&format!("width=\"{full:.1}\"")) && s.contains(&format!("width=\"{:.1}\"", full / 2.0)),
            "{s}"
        );
    }
}
