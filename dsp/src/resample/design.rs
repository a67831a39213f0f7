//! Design of the interpolation filter: a Kaiser-windowed sinc, computed in f64.
//!
//! For an upsampling factor `L` the prototype runs at the output rate `8000·L` and has
//! `N = K·L − 1` taps, `K` taps per polyphase branch (the last slot of the last branch is a
//! zero, which makes `N` odd so that the filter's delay `(N − 1) / 2` is a whole number of
//! output samples and can be removed exactly).
//!
//! The cut-off sits at 4000 Hz, the input's Nyquist frequency and the middle of the transition
//! band 3400 → 4600 Hz. With that choice the sinc crosses zero exactly at every `L`-th tap from
//! the centre, so the branch holding the centre tap is a pure delay: output samples that fall on
//! input instants reproduce the input exactly (an "Nyquist" or interpolating filter). The
//! streaming code relies on that to skip one branch in `L`.
//!
//! The taps are scaled by `L` (zero-stuffing divides the signal's level by `L`), so the response
//! reported by [`magnitude`] is 1.0 in the passband.

use std::f64::consts::PI;

/// Zeroth-order modified Bessel function of the first kind, by its power series
/// `Σ ((x/2)^k / k!)²`, summed until the terms no longer change the result. For the window
/// parameters used here (x ≤ 12) that takes about 30 terms.
pub(crate) fn bessel_i0(x: f64) -> f64 {
    let half = x / 2.0;
    let mut term = 1.0;
    let mut sum = 1.0;
    let mut k = 1.0;
    while term > sum * 1e-17 {
        term *= (half / k) * (half / k);
        sum += term;
        k += 1.0;
    }
    sum
}

/// Kaiser's empirical `β` for a stopband attenuation of `attenuation_db` (Kaiser 1974; valid
/// above 50 dB).
pub(crate) fn kaiser_beta(attenuation_db: f64) -> f64 {
    0.1102 * (attenuation_db - 8.7)
}

/// The full prototype filter for upsampling by `factor`: `taps_per_phase · factor` taps, the last
/// one zero, the others a sinc with zeros every `factor` taps under a Kaiser window of parameter
/// `beta`, scaled by `factor`.
pub(crate) fn prototype(factor: usize, taps_per_phase: usize, beta: f64) -> Vec<f64> {
    let len = taps_per_phase * factor;
    let used = len - 1;
    // Centre of the odd-length filter; an integer number of output samples.
    let centre = (used - 1) / 2;
    let norm = bessel_i0(beta);
    let mut taps = vec![0.0; len];
    for (n, tap) in taps.iter_mut().enumerate().take(used) {
        // Computed from |offset| so that both halves come out bit-identical (exact symmetry,
        // hence exactly linear phase).
        let offset = (n as isize - centre as isize).abs();
        // sinc(offset / factor), with the zeros at whole multiples of `factor` set exactly
        // rather than left as sin(πk) rounding residue, so the centre branch is an exact delay.
        let sinc = if offset == 0 {
            1.0
        } else if offset % factor as isize == 0 {
            0.0
        } else {
            let x = PI * offset as f64 / factor as f64;
            x.sin() / x
        };
        let r = offset as f64 / centre as f64;
        let window = bessel_i0(beta * (1.0 - r * r).max(0.0).sqrt()) / norm;
        *tap = sinc * window;
    }
    taps
}

/// Magnitude response of `taps` at `freq_hz` for a filter running at `rate_hz`, divided by
/// `factor`: the gain a tone at `freq_hz` (or an image of it) gets through the upsampler.
pub(crate) fn magnitude(taps: &[f64], factor: usize, freq_hz: f64, rate_hz: f64) -> f64 {
    let w = 2.0 * PI * freq_hz / rate_hz;
    // The filter is symmetric about its centre; evaluating around the centre gives a real sum
    // (a cosine series) and avoids cancellation between large complex terms.
    let used = taps.len() - 1;
    let centre = (used - 1) / 2;
    let sum: f64 = taps[..used]
        .iter()
        .enumerate()
        .map(|(n, &h)| h * (w * (n as f64 - centre as f64)).cos())
        .sum();
    sum.abs() / factor as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bessel_i0_matches_known_values() {
        // Abramowitz & Stegun, table 9.8 (I0(x) values).
        assert!((bessel_i0(0.0) - 1.0).abs() < 1e-15);
        assert!((bessel_i0(1.0) - 1.266_065_877_752_008_4).abs() < 1e-14);
        assert!((bessel_i0(5.0) - 27.239_871_823_604_44).abs() < 1e-11);
        assert!((bessel_i0(10.0) - 2_815.716_628_466_254).abs() < 1e-9);
    }

    #[test]
    fn centre_branch_is_a_unit_delay_and_the_filter_is_symmetric() {
        for factor in [2, 3, 6] {
            let taps = prototype(factor, 32, 7.0);
            let used = taps.len() - 1;
            let centre = (used - 1) / 2;
            assert_eq!(taps[used], 0.0);
            for n in 0..used {
                assert_eq!(taps[n], taps[used - 1 - n], "symmetry at {n}");
                let offset = n as isize - centre as isize;
                if offset % factor as isize == 0 {
                    let want = if offset == 0 { 1.0 } else { 0.0 };
                    assert_eq!(taps[n], want, "tap {n} of the centre branch");
                }
            }
        }
    }
}
