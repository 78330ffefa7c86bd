//! Small hostile torch checkpoints, built byte by byte (protocol-2 pickles as `torch.save`
//! writes them, inside stored zips).

use std::io::Write;

/// A pickle int: `K` / `J` / 8-byte `LONG1`.
fn int(v: u64) -> Vec<u8> {
    if v < 256 {
        vec![b'K', v as u8]
    } else if v < (1 << 31) {
        let mut b = vec![b'J'];
        b.extend((v as u32).to_le_bytes());
        b
    } else {
        let mut b = vec![0x8a, 8];
        b.extend(v.to_le_bytes());
        b
    }
}

fn string(s: &str) -> Vec<u8> {
    let mut b = vec![b'X'];
    b.extend((s.len() as u32).to_le_bytes());
    b.extend(s.as_bytes());
    b
}

fn tuple(items: &[u64]) -> Vec<u8> {
    let mut b = vec![b'('];
    for &i in items {
        b.extend(int(i));
    }
    b.push(b't');
    b
}

/// `{"weight": view}` of a float storage of `numel` elements: `torch.save`'s layout.
pub fn state_dict(numel: u64, offset: u64, size: &[u64], stride: &[u64]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01");
    p.extend(string("weight"));
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((");
    p.extend(string("storage"));
    p.extend(b"ctorch\nFloatStorage\nq\x03");
    p.extend(string("0"));
    p.extend(string("cpu"));
    p.extend(int(numel));
    p.extend(b"tQ");
    p.extend(int(offset));
    p.extend(tuple(size));
    p.extend(tuple(stride));
    p.extend(b"\x89ccollections\nOrderedDict\n)RtR");
    p.extend(b"s.");
    p
}

/// Lists nested `depth` deep (`]]]…aaa`): a stack-overflow bomb for recursive readers.
pub fn nested_lists(depth: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', depth));
    p.extend(std::iter::repeat_n(b'a', depth - 1));
    p.push(b'.');
    p
}

/// Tuples nested `depth` deep through marks (`((((…tttt`).
pub fn nested_tuples(depth: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b'(', depth));
    p.extend(std::iter::repeat_n(b't', depth));
    p.push(b'.');
    p
}

/// "Billion laughs": memo slot 0 doubled `rounds` times by GET, GET, TUPLE2, PUT.
pub fn memo_doubling(rounds: usize) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(b"]q\x00");
    for _ in 0..rounds {
        p.extend(b"h\x00h\x00\x86q\x00");
    }
    p.push(b'.');
    p
}

/// A torch zip checkpoint: `archive/data.pkl` holding `pickle`, and `archive/data/0`.
pub fn torch_zip(pickle: &[u8], storage: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in [
        ("archive/data.pkl", pickle),
        ("archive/byteorder", b"little".as_slice()),
        ("archive/data/0", storage),
    ] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    buf.into_inner()
}
