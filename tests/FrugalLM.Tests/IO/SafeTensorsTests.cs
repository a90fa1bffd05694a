using System.Buffers.Binary;
using System.Text;
using FrugalLM.IO;
using static TorchSharp.torch;

namespace FrugalLM.Tests.IO;

public sealed class SafeTensorsTests
{
    public SafeTensorsTests() => TestSupport.Init();

    [Fact]
    public void RoundTripsEveryDtypeBitForBit()
    {
        using var dir = TestSupport.TempDir();
        var path = Path.Combine(dir.Path, "t.safetensors");
        var tensors = new List<(string, Tensor)>
        {
            ("a.f32", randn(3, 5)),
            ("b.bf16", randn(7).to(ScalarType.BFloat16)),
            ("c.f16", randn(2, 3, 3).to(ScalarType.Float16)),
            ("d.i64", randint(-1000, 1000, [4], dtype: ScalarType.Int64)),
            ("e.i8", randint(-128, 127, [5, 3], dtype: ScalarType.Int8)),
            ("f.scalar", tensor(3.5f)),
        };
        SafeTensors.Write(path, tensors);
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal("pt", file.Metadata["format"]);
        foreach (var (name, expected) in tensors)
        {
            using var actual = file.Load(name);
            Assert.Equal(expected.dtype, actual.dtype);
            Assert.Equal(expected.shape, actual.shape);
            Assert.True(expected.Same(actual), name);
        }
        // The header is padded to 8 bytes and every tensor is aligned to its element size.
        var bytes = File.ReadAllBytes(path);
        long headerLength = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        Assert.Equal(0, headerLength % 8);
        foreach (var info in file.Tensors.Values)
        {
            Assert.Equal(0, info.Begin % SafeTensors.ElementSize(info.Dtype)!.Value);
        }
    }

    [Fact]
    public void LoadConvertsDtypeAndCopyToFillsInPlace()
    {
        using var dir = TestSupport.TempDir();
        var path = Path.Combine(dir.Path, "t.safetensors");
        using var source = randn(6, 4);
        SafeTensors.Write(path, [("w", source)]);
        using var file = SafeTensorsFile.Open(path);
        using var bf16 = file.Load("w", ScalarType.BFloat16);
        Assert.Equal(ScalarType.BFloat16, bf16.dtype);
        Assert.True(bf16.Same(source.to(ScalarType.BFloat16)));
        using var destination = empty(6, 4);
        file.CopyTo("w", destination);
        Assert.True(destination.Same(source));
        using var wrong = empty(4, 6);
        var error = Assert.Throws<CheckpointFormatException>(() => file.CopyTo("w", wrong));
        Assert.Contains("'w'", error.Message);
        Assert.Contains("[6, 4]", error.Message);
        Assert.Contains("[4, 6]", error.Message);
    }

    [Fact]
    public void WritesConvertedDtypeWhenAsked()
    {
        using var dir = TestSupport.TempDir();
        var path = Path.Combine(dir.Path, "t.safetensors");
        using var source = randn(5, 3);
        SafeTensors.Write(path, [("w", source)], dtype: ScalarType.Float16);
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal("F16", file.Get("w").Dtype);
        using var loaded = file.Load("w");
        Assert.True(loaded.Same(source.to(ScalarType.Float16)));
    }

    public static TheoryData<string, string, string> LyingHeaders => new()
    {
        { "not json", "{not json", "not valid JSON" },
        { "offsets past end", """{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}""", "truncated" },
        { "overlap", """{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", "overlaps" },
        { "byte count", """{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}""", "needs 12 bytes" },
        { "unknown dtype", """{"w":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}""", "unsupported dtype" },
        { "negative shape", """{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}""", "non-negative" },
        { "hole", """{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", "hole" },
    };

    [Theory]
    [MemberData(nameof(LyingHeaders))]
    public void RejectsLyingHeadersNamingFileAndTensor(string label, string header, string expected)
    {
        using var dir = TestSupport.TempDir();
        var path = Path.Combine(dir.Path, "bad.safetensors");
        var headerBytes = Encoding.UTF8.GetBytes(header);
        var data = new byte[8];
        Random.Shared.NextBytes(data);
        var file = new byte[8 + headerBytes.Length + data.Length];
        BinaryPrimitives.WriteInt64LittleEndian(file, headerBytes.Length);
        headerBytes.CopyTo(file, 8);
        data.CopyTo(file, 8 + headerBytes.Length);
        File.WriteAllBytes(path, file);
        var error = Assert.Throws<CheckpointFormatException>(() => SafeTensorsFile.Open(path).Dispose());
        Assert.Contains("bad.safetensors", error.Message);
        Assert.Contains(expected, error.Message);
        Assert.True(label.Length > 0);
    }

    [Fact]
    public void RejectsEveryTruncation()
    {
        using var dir = TestSupport.TempDir();
        var path = Path.Combine(dir.Path, "t.safetensors");
        SafeTensors.Write(path, [("a", randn(3, 3)), ("b", randn(2))]);
        var bytes = File.ReadAllBytes(path);
        var cut = Path.Combine(dir.Path, "cut.safetensors");
        foreach (int length in new[] { 0, 4, 8, 20, bytes.Length / 2, bytes.Length - 1 })
        {
            File.WriteAllBytes(cut, bytes[..length]);
            var error = Assert.Throws<CheckpointFormatException>(() => SafeTensorsFile.Open(cut).Dispose());
            Assert.Contains("cut.safetensors", error.Message);
        }
    }
}
