//! BERT masking: each ordinary token is chosen with probability `prob`; a chosen token becomes
//! [MASK] 80 % of the time, a random ordinary token 10 %, and stays itself 10 %; the model is
//! scored on the chosen positions only. Special tokens are never chosen.

use rand::rngs::StdRng;
use rand::Rng;

use crate::tokenize::SpecialTokens;

/// A masked batch: corrupted ids, and the flat positions chosen with their original ids.
pub struct Masked {
    pub input_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub targets: Vec<u32>,
}

/// Masks `ids` (flat, row-major). `first_ordinary` is the lowest id that is not special, so
/// random replacements are always ordinary tokens. At least one position is chosen whenever
/// any ordinary token exists.
pub fn mask_tokens(
    ids: &[u32],
    special: &SpecialTokens,
    vocab_size: usize,
    first_ordinary: u32,
    prob: f64,
    rng: &mut StdRng,
) -> Masked {
    let is_special = |t: u32| {
        t == special.cls
            || t == special.sep
            || t == special.pad
            || t == special.mask
            || t == special.unk
    };
    let mut chosen: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|&(_, &t)| !is_special(t) && rng.random::<f64>() < prob)
        .map(|(i, _)| i)
        .collect();
    if chosen.is_empty() {
        chosen.extend(ids.iter().position(|&t| !is_special(t)));
    }
    let mut input_ids = ids.to_vec();
    for &i in &chosen {
        let r: f64 = rng.random();
        if r < 0.8 {
            input_ids[i] = special.mask;
        } else if r < 0.9 {
            input_ids[i] = rng.random_range(first_ordinary..vocab_size as u32);
        }
    }
    let targets = chosen.iter().map(|&i| ids[i]).collect();
    let positions = chosen.into_iter().map(|i| i as u32).collect();
    Masked {
        input_ids,
        positions,
        targets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const SPECIAL: SpecialTokens = SpecialTokens {
        unk: 0,
        cls: 1,
        sep: 2,
        pad: 3,
        mask: 4,
    };

    #[test]
    fn proportions_hold_and_specials_are_never_masked() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut ids = Vec::new();
        for row in 0..400 {
            ids.push(1);
            ids.extend((0..100).map(|j| 5 + ((row * 7 + j * 13) % 90) as u32));
            ids.push(2);
            ids.extend([3, 3, 3]);
        }
        let m = mask_tokens(&ids, &SPECIAL, 100, 5, 0.15, &mut rng);
        let ordinary = ids.iter().filter(|&&t| t >= 5).count() as f64;
        let chosen = m.positions.len() as f64;
        assert!(
            (chosen / ordinary - 0.15).abs() < 0.01,
            "chosen {}",
            chosen / ordinary
        );
        let (mut masked, mut random, mut kept) = (0.0, 0.0, 0.0);
        for (&p, &t) in m.positions.iter().zip(&m.targets) {
            let p = p as usize;
            assert!(ids[p] >= 5, "special token at {p} was chosen");
            assert_eq!(ids[p], t);
            match m.input_ids[p] {
                4 => masked += 1.0,
                x if x == t => kept += 1.0,
                x => {
                    assert!((5..100).contains(&x));
                    random += 1.0
                }
            }
        }
        // A random replacement equals the original 1 time in 95; count those as kept.
        assert!((masked / chosen - 0.8).abs() < 0.02, "{}", masked / chosen);
        assert!((random / chosen - 0.1).abs() < 0.02, "{}", random / chosen);
        assert!((kept / chosen - 0.1).abs() < 0.02, "{}", kept / chosen);
        for (i, (&a, &b)) in ids.iter().zip(&m.input_ids).enumerate() {
            if a < 5 {
                assert_eq!(a, b, "special token at {i} changed");
            }
        }
    }

    #[test]
    fn a_short_window_still_gets_one_target() {
        let mut rng = StdRng::seed_from_u64(0);
        let m = mask_tokens(&[1, 7, 2], &SPECIAL, 10, 5, 0.0, &mut rng);
        assert_eq!(m.positions, vec![1]);
        assert_eq!(m.targets, vec![7]);
    }
}
