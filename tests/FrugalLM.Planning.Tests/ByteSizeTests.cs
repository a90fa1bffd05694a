using FrugalLM.Planning;

namespace FrugalLM.Planning.Tests;

public sealed class ByteSizeTests
{
    [Theory]
    [InlineData("24GiB", 24L << 30)]
    [InlineData("24 gib", 24L << 30)]
    [InlineData("1.3GB", 1_300_000_000L)]
    [InlineData("512MiB", 512L << 20)]
    [InlineData("80 GB", 80_000_000_000L)]
    [InlineData("1000", 1000L)]
    [InlineData("1000B", 1000L)]
    [InlineData("2KiB", 2048L)]
    public void ParsesBinaryAndDecimalUnits(string text, long expected) => Assert.Equal(expected, ByteSize.Parse(text));

    [Theory]
    [InlineData("24G")]
    [InlineData("-1GB")]
    [InlineData("lots")]
    [InlineData("")]
    public void RefusesAmbiguousOrInvalidSizes(string text)
    {
        Assert.Throws<FormatException>(() => ByteSize.Parse(text));
        Assert.False(ByteSize.TryParse(text, out _));
    }

    [Fact]
    public void FormatsBothUnitsLabelled()
    {
        Assert.Equal("24.00 GiB", ByteSize.FormatGiB(24L << 30));
        Assert.Equal("25.77 GB", ByteSize.FormatGB(24L << 30));
    }
}
