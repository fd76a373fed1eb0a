//! Latency-against-rate charts for the benchmark report: one PNG with a panel per client
//! mode, a colour per proxy, and the p50, p99 and p99.9 of each as a solid, dashed and dotted
//! line on a log latency axis, so the rate at which a proxy saturates stands out.
//!
//! Text is drawn with DejaVu Sans read from Debian's `fonts-dejavu-core` (the benchmark setup
//! installs it); without it [`latency_png`] fails with an error naming the package.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use plotters::{
    backend::DrawingBackend,
    coord::Shift,
    element::DashedPathElement,
    prelude::*,
    style::{
        register_font,
        text_anchor::{HPos, Pos, VPos},
        FontStyle,
    },
};

/// The font every label is drawn with (the title in its bold, when present).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_BOLD: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";
/// The Debian package that ships [`FONT`].
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";

/// Pixel size of one panel; panels stand side by side.
const PANEL_WIDTH: u32 = 800;
const HEIGHT: u32 = 680;
const LEGEND_HEIGHT: u32 = 44;

/// One proxy's measurements in one mode; the points in any order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

/// The latency percentiles measured at one offered rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// Offered rate, requests per second.
    pub rate: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("cannot read the chart font {path}: install the Debian package {FONT_PACKAGE}")]
    Font {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a font the chart can use (reinstall {FONT_PACKAGE})")]
    FontInvalid { path: PathBuf },
    #[error("draw the chart {path}")]
    Draw {
        path: PathBuf,
        #[source]
        source: DrawingAreaErrorKind<BackendError>,
    },
}

/// Colour-blind-safe colours (Okabe and Ito), given to the series by first appearance.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0x33, 0x33, 0x33),
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xD5, 0x5E, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x56, 0xB4, 0xE9),
];

/// The percentiles drawn, each in its own line style: solid, dashed, dotted.
#[derive(Clone, Copy)]
enum Percentile {
    P50,
    P99,
    P999,
}

impl Percentile {
    const ALL: [Self; 3] = [Self::P50, Self::P99, Self::P999];

    fn label(self) -> &'static str {
        match self {
            Self::P50 => "p50",
            Self::P99 => "p99",
            Self::P999 => "p99.9",
        }
    }

    fn of(self, p: &Point) -> u64 {
        match self {
            Self::P50 => p.p50_us,
            Self::P99 => p.p99_us,
            Self::P999 => p.p999_us,
        }
    }

    /// Dash and gap lengths in pixels; none for a solid line.
    fn dashes(self) -> Option<(u32, u32)> {
        match self {
            Self::P50 => None,
            Self::P99 => Some((9, 6)),
            Self::P999 => Some((2, 5)),
        }
    }
}

/// Writes a PNG of `panels` (a caption and its series each, side by side) to `path`.
/// A series with no points is left out; a panel with none says so.
pub fn latency_png(
    path: &Path,
    title: &str,
    panels: &[(&str, &[Series])],
) -> Result<(), ChartError> {
    load_fonts()?;
    let draw_err = |source| ChartError::Draw {
        path: path.to_owned(),
        source,
    };
    let size = image_size(panels.len());
    let root = BitMapBackend::new(path, size).into_drawing_area();
    draw(&root, title, panels).map_err(draw_err)?;
    root.present().map_err(draw_err)
}

/// Width and height in pixels of a chart with `panels` panels.
fn image_size(panels: usize) -> (u32, u32) {
    let n = u32::try_from(panels.max(1)).unwrap_or(u32::MAX);
    (PANEL_WIDTH.saturating_mul(n), HEIGHT)
}

type BackendError = <BitMapBackend<'static> as DrawingBackend>::ErrorType;
type DrawResult = Result<(), DrawingAreaErrorKind<BackendError>>;

fn draw(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    panels: &[(&str, &[Series])],
) -> DrawResult {
    root.fill(&WHITE)?;
    let body = root
        .margin(10, 6, 0, 0)
        .titled(title, ("sans-serif", 26, FontStyle::Bold))?;
    let height = body.dim_in_pixel().1;
    let (plots, legend) = body.split_vertically(height.saturating_sub(LEGEND_HEIGHT));

    let colours = colours(panels);
    let all: Vec<u64> = panels
        .iter()
        .flat_map(|(_, series)| series.iter())
        .flat_map(|s| s.points.iter())
        .flat_map(|p| [p.p50_us, p.p99_us, p.p999_us])
        .collect();
    let latency = decades(&all);

    let areas = plots.split_evenly((1, panels.len().max(1)));
    for ((caption, series), area) in panels.iter().zip(&areas) {
        panel(area, caption, series, &colours, latency)?;
    }
    draw_legend(&legend, &colours)
}

/// The distinct series names in order of first appearance, each with its colour.
fn colours(panels: &[(&str, &[Series])]) -> Vec<(String, RGBColor)> {
    let mut out: Vec<(String, RGBColor)> = Vec::new();
    for s in panels.iter().flat_map(|(_, series)| series.iter()) {
        if s.points.is_empty() || out.iter().any(|(n, _)| *n == s.name) {
            continue;
        }
        out.push((s.name.clone(), PALETTE[out.len() % PALETTE.len()]));
    }
    out
}

/// The smallest range of whole decades (in µs) holding every value, at least one decade.
fn decades(values: &[u64]) -> (f64, f64) {
    let lo = values.iter().copied().min().unwrap_or(100).max(1);
    let hi = values.iter().copied().max().unwrap_or(10_000).max(lo);
    let mut bottom = 1u64;
    while bottom.saturating_mul(10) <= lo {
        bottom *= 10;
    }
    let mut top = bottom.saturating_mul(10);
    while top < hi {
        top = top.saturating_mul(10);
    }
    (bottom as f64, top as f64)
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    series: &[Series],
    colours: &[(String, RGBColor)],
    (lo, hi): (f64, f64),
) -> DrawResult {
    let mut rates: Vec<u64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.rate))
        .filter(|r| *r > 0)
        .collect();
    rates.sort_unstable();
    rates.dedup();
    let (first, last) = match (rates.first(), rates.last()) {
        (Some(&a), Some(&b)) => (a as f64, b as f64),
        _ => (100.0, 10_000.0),
    };
    let x = (first / 1.3..last * 1.3)
        .log_scale()
        .with_key_points(rates.iter().map(|&r| r as f64).collect());
    let mut bold = Vec::new();
    let mut light = Vec::new();
    let mut decade = lo;
    while decade <= hi {
        bold.push(decade);
        light.extend([2.0 * decade, 5.0 * decade].into_iter().filter(|v| *v < hi));
        decade *= 10.0;
    }
    let y = (lo..hi)
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light);

    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .margin_right(24)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("offered rate (requests/s, log scale)")
        .y_desc("latency (log scale)")
        .x_label_formatter(&|r| format!("{r:.0}"))
        .y_label_formatter(&|us| micros(*us))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .bold_line_style(RGBColor(0xC8, 0xC8, 0xC8))
        .light_line_style(RGBColor(0xEC, 0xEC, 0xEC))
        .draw()?;

    if rates.is_empty() {
        let (w, h) = area.dim_in_pixel();
        let style = TextStyle::from(("sans-serif", 20))
            .color(&RGBColor(0x88, 0x88, 0x88))
            .pos(Pos::new(HPos::Center, VPos::Center));
        area.draw_text(
            "no data",
            &style,
            (
                i32::try_from(w / 2).unwrap_or(0),
                i32::try_from(h / 2).unwrap_or(0),
            ),
        )?;
        return Ok(());
    }

    for s in series {
        let Some(colour) = colours.iter().find(|(n, _)| *n == s.name).map(|(_, c)| *c) else {
            continue;
        };
        let mut points: Vec<&Point> = s.points.iter().filter(|p| p.rate > 0).collect();
        points.sort_by_key(|p| p.rate);
        for percentile in Percentile::ALL {
            let line: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.rate as f64, percentile.of(p).clamp(1, hi as u64) as f64))
                .collect();
            let style = colour.stroke_width(2);
            match percentile.dashes() {
                None => {
                    chart.draw_series(LineSeries::new(line.iter().copied(), style))?;
                }
                Some((dash, gap)) => {
                    chart.draw_series(DashedLineSeries::new(
                        line.iter().copied(),
                        dash,
                        gap,
                        style,
                    ))?;
                }
            }
            chart.draw_series(
                line.iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, colour.filled())),
            )?;
        }
    }
    Ok(())
}

/// The strip under the panels: a swatch per proxy, then the line style per percentile.
fn draw_legend(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    colours: &[(String, RGBColor)],
) -> DrawResult {
    let text = TextStyle::from(("sans-serif", 16)).pos(Pos::new(HPos::Left, VPos::Center));
    let advance = |label: &str| {
        let (w, _) = area.estimate_text_size(label, &text).unwrap_or((0, 0));
        i32::try_from(w).unwrap_or(0)
    };
    // Swatch and gap before each label, space after it; a wider gap between the two keys.
    let proxies: i32 = colours.iter().map(|(n, _)| 20 + advance(n) + 28).sum();
    let lines: i32 = Percentile::ALL
        .iter()
        .map(|p| 52 + advance(p.label()) + 28)
        .sum();
    let (width, height) = area.dim_in_pixel();
    let width = i32::try_from(width).unwrap_or(0);
    let mid = i32::try_from(height / 2).unwrap_or(0);
    let mut x = ((width - proxies - 32 - lines) / 2).max(8);
    for (name, colour) in colours {
        area.draw(&Rectangle::new(
            [(x, mid - 7), (x + 14, mid + 7)],
            colour.filled(),
        ))?;
        area.draw(&Text::new(name.as_str(), (x + 20, mid), &text))?;
        x += 20 + advance(name) + 28;
    }
    x += 32;
    for percentile in Percentile::ALL {
        let style = BLACK.stroke_width(2);
        let path = [(x, mid), (x + 44, mid)];
        match percentile.dashes() {
            None => area.draw(&PathElement::new(path, style))?,
            Some((dash, gap)) => area.draw(&DashedPathElement::new(path, dash, gap, style))?,
        }
        let label = percentile.label();
        area.draw(&Text::new(label, (x + 52, mid), &text))?;
        x += 52 + advance(label) + 28;
    }
    Ok(())
}

/// A latency in µs as a tick label: `250 µs`, `2 ms`, `1.5 s`.
fn micros(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{} s", trim(us / 1_000_000.0))
    } else if us >= 1_000.0 {
        format!("{} ms", trim(us / 1_000.0))
    } else {
        format!("{} µs", trim(us))
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_owned)
}

/// Registers DejaVu Sans (and its bold, when present) as the chart's `sans-serif`, once.
fn load_fonts() -> Result<(), ChartError> {
    static LOADED: Mutex<bool> = Mutex::new(false);
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if *loaded {
        return Ok(());
    }
    let read = |path: &str| -> Result<&'static [u8], ChartError> {
        let bytes = std::fs::read(path).map_err(|source| ChartError::Font {
            path: path.into(),
            source,
        })?;
        // The font table keeps `'static` references; each file is read once per process.
        Ok(Box::leak(bytes.into_boxed_slice()))
    };
    register_font("sans-serif", FontStyle::Normal, read(FONT)?)
        .map_err(|_| ChartError::FontInvalid { path: FONT.into() })?;
    if let Ok(bold) = read(FONT_BOLD) {
        register_font("sans-serif", FontStyle::Bold, bold).map_err(|_| {
            ChartError::FontInvalid {
                path: FONT_BOLD.into(),
            }
        })?;
    }
    *loaded = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file under the temp dir, removed on drop (also when the test fails).
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str) -> Self {
            Self(std::env::temp_dir().join(format!("tg-chart-{}-{name}.png", std::process::id())))
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn series(name: &str, points: &[(u64, u64, u64, u64)]) -> Series {
        Series {
            name: name.to_owned(),
            points: points
                .iter()
                .map(|&(rate, p50_us, p99_us, p999_us)| Point {
                    rate,
                    p50_us,
                    p99_us,
                    p999_us,
                })
                .collect(),
        }
    }

    /// Two modes as the benchmark measures them: one proxy saturating, one not installed.
    fn sample() -> (Vec<Series>, Vec<Series>) {
        let kept = vec![
            series(
                "direct",
                &[
                    (1000, 160, 420, 900),
                    (2000, 170, 480, 1_100),
                    (5000, 190, 700, 2_400),
                ],
            ),
            series(
                "Tollgate",
                &[
                    (1000, 270, 640, 1_500),
                    (2000, 290, 760, 2_100),
                    (5000, 340, 1_400, 5_200),
                ],
            ),
            series(
                "nginx",
                &[
                    (1000, 250, 600, 1_300),
                    (2000, 260, 690, 1_900),
                    (5000, 300, 1_200, 4_100),
                ],
            ),
            series(
                "LiteLLM",
                &[
                    (1000, 9_800, 1_900_000, 3_100_000),
                    (2000, 2_400_000, 6_800_000, 9_900_000),
                ],
            ),
            series("Portkey", &[]),
        ];
        let fresh = vec![
            series(
                "direct",
                &[
                    (500, 210, 520, 1_000),
                    (1000, 220, 560, 1_300),
                    (2000, 240, 800, 2_900),
                ],
            ),
            series(
                "Tollgate",
                &[
                    (500, 390, 900, 2_000),
                    (1000, 410, 1_000, 2_600),
                    (2000, 470, 2_100, 9_000),
                ],
            ),
            series(
                "nginx",
                &[
                    (500, 330, 780, 1_700),
                    (1000, 350, 850, 2_300),
                    (2000, 420, 1_900, 7_400),
                ],
            ),
            series(
                "LiteLLM",
                &[
                    (500, 14_000, 240_000, 900_000),
                    (1000, 1_100_000, 5_200_000, 8_800_000),
                ],
            ),
        ];
        (kept, fresh)
    }

    fn decode(path: &Path) -> (png::OutputInfo, Vec<u8>) {
        let file = std::fs::File::open(path).expect("open the chart");
        let mut reader = png::Decoder::new(file).read_info().expect("a PNG header");
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).expect("PNG pixels");
        pixels.truncate(info.buffer_size());
        (info, pixels)
    }

    #[test]
    fn draws_a_png_of_the_expected_size_with_every_series() {
        let file = TempFile::new("two-panels");
        let (kept, fresh) = sample();
        let panels: [(&str, &[Series]); 2] = [
            ("kept-alive connections", &kept),
            ("a new connection per request", &fresh),
        ];
        latency_png(&file.0, "HTTP latency against offered rate", &panels).expect("draw the chart");

        let bytes = std::fs::read(&file.0).expect("read the chart");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
        let width = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let height = u32::from_be_bytes(bytes[20..24].try_into().expect("4 bytes"));
        assert_eq!((width, height), (2 * PANEL_WIDTH, HEIGHT));

        let (info, pixels) = decode(&file.0);
        assert_eq!(info.color_type, png::ColorType::Rgb, "RGB pixels");
        let rgb: Vec<[u8; 3]> = pixels.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        let background = rgb.iter().filter(|p| **p == [0xFF; 3]).count();
        assert!(background > rgb.len() / 2, "mostly white background");
        assert!(
            rgb.len() - background > rgb.len() / 100,
            "something is drawn"
        );
        // Every series with data is drawn in its own colour; the one without data is not.
        for (i, name) in ["direct", "Tollgate", "nginx", "LiteLLM", "Portkey"]
            .iter()
            .enumerate()
        {
            let RGBColor(r, g, b) = PALETTE[i];
            let count = rgb.iter().filter(|p| **p == [r, g, b]).count();
            if *name == "Portkey" {
                assert_eq!(count, 0, "{name} has no data and no colour");
            } else {
                assert!(count > 100, "{name} drawn in its colour: {count} pixels");
            }
        }
    }

    #[test]
    fn draws_panels_without_data() {
        let file = TempFile::new("empty");
        let none = [series("direct", &[])];
        let panels: [(&str, &[Series]); 2] = [
            ("kept-alive connections", &none),
            ("a new connection per request", &[]),
        ];
        latency_png(&file.0, "no data", &panels).expect("draw the chart");
        let (info, _) = decode(&file.0);
        assert_eq!((info.width, info.height), (2 * PANEL_WIDTH, HEIGHT));
    }

    #[test]
    fn latency_axis_spans_whole_decades() {
        for (values, want) in [
            (&[160, 9_900_000][..], (100.0, 10_000_000.0)),
            (&[100, 1_000][..], (100.0, 1_000.0)),
            (&[0, 5][..], (1.0, 10.0)),
            (&[250][..], (100.0, 1_000.0)),
            (&[][..], (100.0, 10_000.0)),
        ] {
            assert_eq!(decades(values), want, "{values:?}");
        }
    }

    #[test]
    fn tick_labels_carry_their_unit() {
        for (us, want) in [
            (100.0, "100 µs"),
            (2_000.0, "2 ms"),
            (1_500_000.0, "1.5 s"),
            (10_000_000.0, "10 s"),
        ] {
            assert_eq!(micros(us), want);
        }
    }

    #[test]
    fn a_missing_font_names_its_package() {
        let err = ChartError::Font {
            path: FONT.into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        assert!(err.to_string().contains(FONT_PACKAGE), "{err}");
    }
}
